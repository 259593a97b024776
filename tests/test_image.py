"""The container images, built from ./Dockerfile by scripts/image (the default image, the controller's, and
the `agent` target, the DaemonSet's), run with podman as deploy/ runs them.

Each program runs with what its manifest says, read from the YAML: user and group, read-only root
filesystem, no capabilities, no privilege escalation, the emptyDir /tmp, the memory and CPU limits, the
env (downward-API fields filled in as the kubelet would) and the args. The test changes only what points
at the test's world: the IMDS endpoint and the listen address (flags the manifest sets), a kubeconfig
mounted read-only instead of the service account, and for the controller the per-cluster SQS queue and
AWS endpoint. Both containers use the host network: the fakes listen on 127.0.0.1 of this machine.

Under CI=true nothing here skips: a machine that cannot build or run the image fails the test command.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from spotd.sim.imds import FakeImds
from spotd.sim.kubeapi import FakeApiServer
from tests.agent_harness import eventually, free_port, node_obj, pod_obj
from tests.moto_server import EVENTS_QUEUE, MotoAws, aws, moto_endpoint  # noqa: F401  (pytest fixtures)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CONTAINERS_CONF = ROOT / "scripts" / "containers.conf"
IN_CI = os.environ.get("CI", "").lower() == "true"
NODE = "ip-10-0-1-10.ec2.internal"
KUBECONFIG = "/etc/spotd/kubeconfig"  # where the test mounts it; in a cluster the service account is used

# The first test may build the image (scripts/image, about two minutes cold); every wait below has its own
# shorter limit.
pytestmark = [pytest.mark.image, pytest.mark.timeout(1200)]

Doc = dict[str, Any]


# ---- the manifests ------------------------------------------------------------------------------------


def workload(file: str, kind: str) -> Doc:
    with (DEPLOY / file).open() as f:
        (doc,) = [d for d in yaml.safe_load_all(f) if d and d["kind"] == kind]
    return doc


def daemonset() -> Doc:
    return workload("daemonset.yaml", "DaemonSet")


def deployment() -> Doc:
    return workload("deployment.yaml", "Deployment")


def container_of(doc: Doc) -> Doc:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return container


def grace_of(doc: Doc) -> int:
    return int(doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])


def startup_budget(doc: Doc) -> float:
    """How long the kubelet lets the container start: the startup probe's period times its threshold."""
    probe = container_of(doc)["startupProbe"]
    return float(probe["periodSeconds"] * probe["failureThreshold"])


def quantity(value: str) -> float:
    """A Kubernetes resource quantity ("128Mi", "100m", "2") as a plain number (bytes, cores)."""
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9, "m": 10**-3}
    for suffix, factor in suffixes.items():
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


def run_options(doc: Doc, *, pod_name: str, env: dict[str, str] | None = None) -> list[str]:
    """`podman run` options for the workload's container as the kubelet would run it on NODE, with `env`
    replacing or adding variables. Fails on a field it does not know how to translate."""
    pod = doc["spec"]["template"]["spec"]
    container = container_of(doc)
    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    assert security.get("privileged", False) is False
    assert security.get("seccompProfile", {}).get("type", "RuntimeDefault") == "RuntimeDefault"  # podman's default
    options = ["--network", "host", "--user", f"{security['runAsUser']}:{security['runAsGroup']}"]
    if security.get("readOnlyRootFilesystem"):
        # Without --read-only-tmpfs=false podman would also make /tmp, /var/tmp and /run writable.
        options += ["--read-only", "--read-only-tmpfs=false"]
    if security.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    for cap in security.get("capabilities", {}).get("drop", []):
        options += ["--cap-drop", cap]
    for cap in security.get("capabilities", {}).get("add", []):
        options += ["--cap-add", cap]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        assert set(volume) == {"name", "emptyDir"}, f"only emptyDir volumes are translated: {volume}"
        size = volume["emptyDir"].get("sizeLimit")
        options += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777" + (f",size={int(quantity(size))}" if size else "")]
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        options += ["--memory", str(int(quantity(limits["memory"])))]
    if "cpu" in limits:
        options += ["--cpus", str(quantity(limits["cpu"]))]
    fields = {"spec.nodeName": NODE, "metadata.name": pod_name, "metadata.namespace": doc["metadata"]["namespace"]}
    variables: dict[str, str] = {}
    for var in container.get("env", []):
        variables[var["name"]] = var["value"] if "value" in var else fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    variables.update(env or {})
    for name, value in variables.items():
        options += ["--env", f"{name}={value}"]
    if "command" in container:
        options += ["--entrypoint", json.dumps(container["command"])]
    return options


def args_with(args: list[str], **flags: str) -> list[str]:
    """The manifest's args with these flags' values (`listen="..."` is `--listen`) replaced, or added."""
    out = list(args)
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        for i, arg in enumerate(out):
            if arg.startswith(flag + "="):
                out[i] = f"{flag}={value}"
                break
            if arg == flag:
                out[i + 1] = value
                break
        else:
            out.append(f"{flag}={value}")
    return out


def project_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


# ---- podman -------------------------------------------------------------------------------------------


def podman(*args: str, timeout: float = 120) -> str:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert out.returncode == 0, f"podman {' '.join(args[:2])} exited {out.returncode}: {out.stderr[-2000:]}"
    return out.stdout


def built(target: str | None, variable: str) -> str:
    """The tag of the Dockerfile's `target` (None: the default image): from scripts/test when it set
    `variable` and `variable`_STATUS (it builds first, with its progress shown), else built here."""
    if f"{variable}_STATUS" in os.environ:
        status, tag, detail = int(os.environ[f"{variable}_STATUS"]), os.environ.get(variable, ""), ""
    else:
        command = [str(ROOT / "scripts" / "image"), *(["--target", target] if target else [])]
        build = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        status, tag, detail = build.returncode, (build.stdout.split() or [""])[-1], build.stderr[-3000:]
    if status == 0 and tag:
        return tag
    reason = f"scripts/image{' --target ' + target if target else ''} exited {status}: {detail.strip() or 'see above'}"
    if status == 3 and not IN_CI:
        pytest.skip(reason)
    pytest.fail(reason)


@pytest.fixture(scope="session")
def image() -> str:
    """The default image (the Dockerfile's last stage, spotd[aws]): the Deployment's, the controller's."""
    return built(None, "SPOTD_IMAGE")


@pytest.fixture(scope="session")
def agent_image() -> str:
    """The Dockerfile's agent target: the DaemonSet's image, without boto3 and aiohttp."""
    return built("agent", "SPOTD_AGENT_IMAGE")


IMAGES = pytest.mark.parametrize("which", ["image", "agent_image"], ids=["default", "agent"])


def pull_size(image: str, tmp_path: Path) -> int:
    """Bytes a node pulls: the image's layers gzip-compressed, as a registry push stores them."""
    out = tmp_path / "pushed"
    podman("push", "--quiet", "--compress", "--compression-format", "gzip", image, f"dir:{out}", timeout=600)
    manifest = json.loads((out / "manifest.json").read_text())
    return sum(int(layer["size"]) for layer in manifest["layers"])


class Container:
    """A detached `podman run`, removed at the end. The methods a test awaits run podman in a thread: the
    fakes it talks to live on the test's event loop, which must keep answering meanwhile."""

    def __init__(self, image: str, options: list[str], args: list[str]) -> None:
        self.name = f"spotd-test-{uuid.uuid4().hex[:12]}"
        self.command = ["run", "--detach", "--name", self.name, *options, image, *args]

    def __enter__(self) -> Container:
        podman(*self.command)
        return self

    def __exit__(self, *_: object) -> None:
        podman("rm", "--force", "--time", "0", self.name)

    def logs(self) -> str:
        return podman("logs", self.name)

    async def ready(self, port: int, timeout: float) -> float:
        """Seconds until /readyz answers 200; fails with the logs if the container exits first."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if await asyncio.to_thread(http_status, port, "/readyz") == 200:
                return time.monotonic() - started
            running = await asyncio.to_thread(podman, "inspect", "--format", "{{.State.Running}}", self.name)
            assert running.strip() == "true", f"the container exited:\n{self.logs()[-3000:]}"
            await asyncio.sleep(0.2)
        raise AssertionError(f"not ready within {timeout}s:\n{self.logs()[-3000:]}")

    async def rss_mb(self) -> float:
        """The resident set of the container's PID 1 (spotd itself: the image has no init)."""
        status = await asyncio.to_thread(podman, "exec", self.name, "cat", "/proc/1/status")
        (line,) = [x for x in status.splitlines() if x.startswith("VmRSS:")]
        return int(line.split()[1]) / 1024

    async def cgroup_memory(self) -> str:
        """What `podman stats` reports: the container's cgroup memory usage and limit."""
        stats = await asyncio.to_thread(podman, "stats", "--no-stream", "--format", "{{.MemUsage}}", self.name)
        return stats.strip()

    async def stop(self, grace: int) -> tuple[int, float]:
        """`podman stop -t grace` (SIGTERM, then SIGKILL after grace seconds): exit code and seconds taken."""
        started = time.monotonic()
        await asyncio.to_thread(podman, "stop", "--time", str(grace), self.name, timeout=grace + 30)
        took = time.monotonic() - started
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name)), took

    def written_bytecode(self) -> list[str]:
        """The .pyc files the run added to the image's filesystem."""
        return [line.split()[-1] for line in podman("diff", self.name).splitlines() if line.endswith(".pyc")]


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """A figure in the test command's output, captured or not."""
    with capsys.disabled():
        print(f"\n[image] {line}", flush=True)


def bytecode_probe_options(options: list[str]) -> list[str]:
    """The same run, but as root on a writable root filesystem and allowed to write bytecode: every .pyc
    Python then writes is one the image lacks, and which the read-only pod compiles at each start."""
    out: list[str] = []
    rest = iter(options)
    for option in rest:
        if option == "--user":
            next(rest)
            out += ["--user", "0:0"]
        elif option not in ("--read-only", "--read-only-tmpfs=false"):
            out.append(option)
    return [*out, "--env", "PYTHONDONTWRITEBYTECODE="]


PROBE = pytest.mark.parametrize("probe", [False, True], ids=["as-manifest", "bytecode-probe"])


# ---- the image itself ---------------------------------------------------------------------------------


@IMAGES
def test_labels_user_and_entrypoint_match_the_project_and_manifests(
    which: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    image = request.getfixturevalue(which)
    (info,) = json.loads(podman("image", "inspect", image))
    config = info["Config"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == project_version()
    assert labels["org.opencontainers.image.title"] == "spotd"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert config["Entrypoint"] == ["spotd"]
    for doc in (daemonset(), deployment()):
        security = doc["spec"]["template"]["spec"]["securityContext"]
        assert config["User"] == f"{security['runAsUser']}:{security['runAsGroup']}"
        assert container_of(doc)["image"].endswith(":" + project_version())
    # Built on the base the Dockerfile names, pinned to the digest podman holds for it (scripts/image).
    base = labels["org.opencontainers.image.base.name"]
    name, digest = base.split("@")
    assert digest == podman("image", "inspect", "--format", "{{.Digest}}", name).strip()
    report(
        capsys,
        f"image {image}: {info['Size'] / 1e6:.0f} MB, {pull_size(image, tmp_path) / 1e6:.1f} MB to pull (gzip) "
        f"on {name}",
    )


@IMAGES
def test_no_build_tools_or_pip_at_run_time(which: str, request: pytest.FixtureRequest) -> None:
    image = request.getfixturevalue(which)
    # The agent image also lacks what only the controller and the simulation import.
    absent = ["pip", "setuptools", "wheel"] + (["aiohttp", "boto3", "botocore"] if which == "agent_image" else [])
    check = (
        "import importlib.util, json, shutil; print(json.dumps({"
        "'tools': [t for t in ('gcc', 'cc', 'g++', 'make', 'ld', 'pip', 'pip3', 'pip3.11') if shutil.which(t)],"
        f"'modules': [m for m in {absent!r} if importlib.util.find_spec(m)]}}))"
    )
    out = podman("run", "--rm", "--read-only", "--network", "none", "--entrypoint", "python", image, "-c", check)
    assert json.loads(out) == {"tools": [], "modules": []}
    if which == "image":  # the default image keeps everything: the controller, the CLI, simulate-reclaim
        present = "import boto3, aiohttp, spotd.sim.kubeapi"
        podman("run", "--rm", "--read-only", "--network", "none", "--entrypoint", "python", image, "-c", present)


# ---- the agent ----------------------------------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer(host="127.0.0.1", port=0, termination_scale=0.0)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def imds() -> AsyncIterator[FakeImds]:
    fake = FakeImds()
    await fake.start()
    yield fake
    await fake.stop()


def kubeconfig_of(api: FakeApiServer, tmp_path: Path, account: str, node: str | None = None) -> str:
    """The ServiceAccount's token, as a pod of it would have, under deploy/'s RBAC and admission policies."""
    if api.get("ClusterRole", "spotd-agent") is None:
        api.load_manifests([DEPLOY])
    token = api.service_account_token("spotd", account, node_name=node)
    path = api.write_kubeconfig(tmp_path / f"kubeconfig-{account}", token=token)
    path.chmod(0o644)  # read by the container's user through the read-only bind mount
    return str(path)


def pods_on_node(api: FakeApiServer) -> list[str]:
    return sorted(p["metadata"]["name"] for p in api.list("Pod") if p["spec"].get("nodeName") == NODE)


@PROBE
async def test_agent_drains_its_node_on_a_spot_notice(
    agent_image: str,
    api: FakeApiServer,
    imds: FakeImds,
    probe: bool,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    ds = daemonset()
    api.create(node_obj(NODE))
    kubeconfig = kubeconfig_of(api, tmp_path, "spotd-agent", node=NODE)
    for i in range(10):
        api.create(pod_obj(f"web-{i}", NODE))
    api.create(pod_obj("logs-agent", NODE, owner="DaemonSet", labels={"app": "logs"}))
    port = free_port()
    options = [*run_options(ds, pod_name="spotd-agent-x7k2p"), "--volume", f"{kubeconfig}:{KUBECONFIG}:ro"]
    if probe:
        options = bytecode_probe_options(options)
    args = args_with(
        container_of(ds)["args"], imds_endpoint=imds.url, listen=f"127.0.0.1:{port}", kubeconfig=KUBECONFIG
    )
    assert "PYTHONOPTIMIZE=2" in options, "the DaemonSet runs the agent with -OO"

    with Container(agent_image, options, args) as agent:
        ready_after = await agent.ready(port, timeout=startup_budget(ds))
        rss_idle = await agent.rss_mb()
        cgroup_idle = await agent.cgroup_memory()

        imds.set_instance_action("terminate", datetime.now(UTC) + timedelta(seconds=120))
        await eventually(lambda: pods_on_node(api) == ["logs-agent"], timeout=30)

        def tainted_and_cordoned() -> bool:  # written by the agent's node task, not ordered with the evictions
            node = api.get("Node", NODE) or {"spec": {}}
            taints = node["spec"].get("taints") or []
            return node["spec"].get("unschedulable") is True and any(
                t["key"] == "spotd.io/interruption" for t in taints
            )

        await eventually(tainted_and_cordoned, timeout=5)
        rss_drained = await agent.rss_mb()

        grace = grace_of(ds)
        code, took = await agent.stop(grace)
        logs = agent.logs()
        assert code == 0, logs[-3000:]
        assert took < grace, f"SIGTERM took {took:.1f}s, the grace is {grace}s"
        if probe:
            assert agent.written_bytecode() == [], "modules the agent imports without their .pyc in the image"
        else:
            # Every line is a structured event: no traceback, no warning about the read-only filesystem.
            for line in logs.splitlines():
                json.loads(line)
            report(
                capsys,
                f"agent (as the DaemonSet): ready {ready_after:.1f}s after start, "
                f"RSS {rss_idle:.1f} MB idle (podman stats: {cgroup_idle}), {rss_drained:.1f} MB after draining "
                f"10 pods, stopped in {took:.1f}s",
            )


# ---- the controller -----------------------------------------------------------------------------------


@PROBE
async def test_controller_takes_its_lease_and_is_ready(
    image: str,
    api: FakeApiServer,
    aws: MotoAws,  # noqa: F811
    probe: bool,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    kubeconfig = kubeconfig_of(api, tmp_path, "spotd-controller")
    deploy = deployment()
    namespace = deploy["metadata"]["namespace"]
    lease_name = next(a.split("=", 1)[1] for a in container_of(deploy)["args"] if a.startswith("--lease-name="))
    api.create(node_obj("ip-10-0-2-20.ec2.internal", labels={"eks.amazonaws.com/capacityType": "ON_DEMAND"}))
    queue_url = aws.client("sqs").create_queue(QueueName=EVENTS_QUEUE)["QueueUrl"]
    pod_name = "spotd-controller-6d9f7-abcde"
    port = free_port()
    # The per-cluster values the manifest says to patch (queue URL), and the test's AWS (moto).
    aws_env = {
        "SPOTD_SQS_QUEUE_URL": queue_url,
        "AWS_ENDPOINT_URL": aws.url,
        "AWS_ACCESS_KEY_ID": aws.controller.access_key_id,  # the controller's IAM user: deploy/iam-policy.json
        "AWS_SECRET_ACCESS_KEY": aws.controller.secret_access_key,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    options = [*run_options(deploy, pod_name=pod_name, env=aws_env), "--volume", f"{kubeconfig}:{KUBECONFIG}:ro"]
    if probe:
        options = bytecode_probe_options(options)
    args = args_with(container_of(deploy)["args"], listen=f"127.0.0.1:{port}", kubeconfig=KUBECONFIG)

    def holder() -> str:
        lease = api.get("Lease", lease_name, namespace)
        return str((lease or {}).get("spec", {}).get("holderIdentity") or "")

    with Container(image, options, args) as controller:
        ready_after = await controller.ready(port, timeout=startup_budget(deploy))
        await eventually(lambda: holder() == pod_name, timeout=30)
        rss = await controller.rss_mb()

        grace = grace_of(deploy)
        code, took = await controller.stop(grace)
        logs = controller.logs()
        assert code == 0, logs[-3000:]
        assert took < grace, f"SIGTERM took {took:.1f}s, the grace is {grace}s"
        assert holder() == "", "the leader releases its Lease on SIGTERM"
        if probe:
            assert controller.written_bytecode() == [], "modules the controller imports without their .pyc"
        else:
            for line in logs.splitlines():
                json.loads(line)
            report(
                capsys,
                f"controller (as the Deployment): ready {ready_after:.1f}s after start, RSS {rss:.1f} MB, "
                f"stopped in {took:.1f}s",
            )
