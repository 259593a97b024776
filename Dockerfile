# syntax=docker/dockerfile:1
# Two images from one Dockerfile, both installed from hash-locked requirements (requirements/*.lock, written
# by requirements/compile from pyproject.toml):
#   default (the last stage, `controller`): spotd[aws], for `spotd controller` (Deployment) and the CLI
#   --target agent: for `spotd agent` (DaemonSet) only, without boto3 and aiohttp, which it never imports
# Why two, with the figures: docs/deployment.md#the-image.
#
# The base, pinned by digest with its tag beside it: the tag says what it is, the digest is what is used.
# The default is the base this repository's builds run on (scripts/image, CI): no container registry is
# reachable from them, so it is a local stand-in for python:3.11-slim, and its digest the one podman holds
# (`podman image inspect --format '{{.Digest}}'`). A release build passes the official image the same way:
#   --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<docker buildx imagetools inspect ...>
ARG PYTHON_IMAGE=localhost/spotd-python-base:3.11-bookworm-r1@sha256:a83e8dbeffe15f12a8b5bf2e4e1271104789b79626f6b32c4d8fce79d182cd52

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# .dockerignore lets in only pyproject.toml, README.md, LICENSE, requirements/ and spotd/.
COPY . .
# spotd's own wheel, built by the locked build backend (setuptools, wheel). Its dependencies are not built
# here: each image installs them from its lock file, wheels only, every file checked against its hash.
RUN pip install --require-hashes --only-binary :all: -r requirements/build.lock \
    && pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ARG PYTHON_IMAGE
# Must match [project] version in pyproject.toml (tests/test_deploy.py checks it).
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="spotd" \
      org.opencontainers.image.description="Spot-lifecycle daemon for Kubernetes on AWS: drains reclaimed Spot nodes in time, moves on-demand fallback back to Spot." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/spotd/spotd" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
# 9101: agent, 9102: controller (/healthz, /readyz, /metrics).
EXPOSE 9101 9102
ENTRYPOINT ["spotd"]

# Each image: its lock from PyPI (--require-hashes: a file whose hash is not in the lock stops the build),
# then spotd's wheel from the builder stage through a bind mount, so it never lands in a layer. Bytecode is
# compiled here because the root filesystem is read-only at run time and the agent starts under a 100m CPU
# limit: for plain runs (the controller) and for -OO (the agent runs with PYTHONOPTIMIZE=2,
# deploy/daemonset.yaml), and for the standard library too, since the python:*-slim images ship it without
# any .pyc (site-packages sits inside it there; the two are named for other layouts). pip, setuptools and
# wheel are not needed at run time: removed.
FROM runtime AS agent
ARG VERSION=0.1.0
RUN --mount=type=bind,from=builder,source=/src/requirements,target=/requirements \
    --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --require-hashes --only-binary :all: -r /requirements/agent.lock \
    && pip install --no-deps --no-index "/wheels/spotd-${VERSION}-py3-none-any.whl" \
    && pip uninstall --yes pip setuptools wheel \
    && python -m compileall -q -j 0 -o 0 -o 2 \
        "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \
        "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
ENV PYTHONDONTWRITEBYTECODE=1
# The numeric user of distroless "nonroot"; the manifests' runAsUser matches it.
USER 65532:65532

FROM runtime AS controller
ARG VERSION=0.1.0
RUN --mount=type=bind,from=builder,source=/src/requirements,target=/requirements \
    --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --require-hashes --only-binary :all: -r /requirements/controller.lock \
    && pip install --no-deps --no-index "/wheels/spotd-${VERSION}-py3-none-any.whl" \
    && pip uninstall --yes pip setuptools wheel \
    && python -m compileall -q -j 0 -o 0 -o 2 \
        "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \
        "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
ENV PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
