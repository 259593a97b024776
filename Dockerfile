# syntax=docker/dockerfile:1
# One image, two programs: `spotd agent` (DaemonSet) and `spotd controller` (Deployment).
#
# The base is pinned by tag. For reproducible builds also pin its digest, and let Renovate or
# Dependabot bump it:  FROM python:3.11.14-slim-trixie@sha256:<digest>
#   (docker buildx imagetools inspect python:3.11.14-slim-trixie)
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# .dockerignore lets in only pyproject.toml, README.md, LICENSE and spotd/.
COPY . .
# spotd and every dependency, with the AWS extra the controller needs, as wheels.
RUN pip wheel ".[aws]" --wheel-dir /wheels

FROM ${PYTHON_IMAGE}
# Must match [project] version in pyproject.toml (tests/test_deploy.py checks it).
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="spotd" \
      org.opencontainers.image.description="Spot-lifecycle daemon for Kubernetes on AWS: drains reclaimed Spot nodes in time, moves on-demand fallback back to Spot." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/spotd/spotd" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# Wheels only, from the builder stage through a bind mount, so they never land in a layer. Bytecode is
# compiled here because the root filesystem is read-only at run time and the agent starts under a
# 100m CPU limit: for plain runs (the controller) and for -OO (the agent runs with PYTHONOPTIMIZE=2,
# deploy/daemonset.yaml), and for the standard library too, since the python:*-slim images ship it without
# any .pyc (site-packages sits inside it there; the two are named for other layouts). pip, setuptools and
# wheel are not needed at run time: removed.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "spotd[aws]==${VERSION}" \
    && pip uninstall --yes pip setuptools wheel \
    && python -m compileall -q -j 0 -o 0 -o 2 \
        "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \
        "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The numeric user of distroless "nonroot"; the manifests' runAsUser matches it.
USER 65532:65532
# 9101: agent, 9102: controller (/healthz, /readyz, /metrics).
EXPOSE 9101 9102
ENTRYPOINT ["spotd"]
