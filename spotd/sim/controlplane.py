"""A real Kubernetes control plane on 127.0.0.1 (issue 18): etcd, kube-apiserver (TLS, RBAC, ServiceAccount
signing keys, the default admission plugins), kube-controller-manager (every default controller: disruption,
garbage collector, workloads, node lifecycle, pod GC, ServiceAccounts), kube-scheduler and kwok (nodes and pods
simulated, node addresses on loopback), with deploy/ applied by `kubectl apply -k`.

The tests' `real_cluster` fixture and `spotd simulate-reclaim --embedded --control-plane DIR` start it. The
binaries come from scripts/controlplane (built from Go modules, cached by version); the test command exports
SPOTD_CONTROLPLANE with their directory. deploy/ is read from spotd's source checkout. For humans:

    python -m spotd.sim.controlplane     # start it, print a kubeconfig path, stop on Ctrl-C
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the source checkout: deploy/, scripts/
DEPLOY = ROOT / "deploy"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"  # nodes carrying it (value "fake") are kwok's to run
# a pod carrying this label is no longer run by kwok: its kubelet is gone (a test's dead node)
KUBELET_GONE_LABEL = "spotd.io/test-kubelet-gone"


_PROMETHEUS_RULE_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "prometheusrules.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {"plural": "prometheusrules", "singular": "prometheusrule", "kind": "PrometheusRule"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }
        ],
    },
}


def controlplane_binaries() -> Path:
    """The directory of the built binaries: $SPOTD_CONTROLPLANE, else scripts/controlplane's answer (a build
    when nothing is cached: tens of minutes cold)."""
    given = os.environ.get("SPOTD_CONTROLPLANE")
    if given:
        return Path(given)
    out = subprocess.run([str(ROOT / "scripts" / "controlplane")], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok")


class ControlPlaneUnavailable(Exception):
    """No control plane to start here; the message is one line for the user."""


def find_controlplane(given: str | None = None) -> Path:
    """The directory of a complete set of binaries, for a command rather than the tests: `given`, else
    $SPOTD_CONTROLPLANE, else scripts/controlplane's answer (a build when nothing is cached, its progress on
    stderr). Also checks what start() needs besides: openssl and deploy/. Raises ControlPlaneUnavailable."""
    where = given or os.environ.get("SPOTD_CONTROLPLANE")
    if where:
        bin_dir = Path(where)
    else:
        script = ROOT / "scripts" / "controlplane"
        if not script.is_file():
            raise ControlPlaneUnavailable(
                "no control plane binaries: give DIR or set SPOTD_CONTROLPLANE (scripts/controlplane is not here)"
            )
        if shutil.which("go") is None:
            raise ControlPlaneUnavailable(
                "no control plane binaries: give DIR or set SPOTD_CONTROLPLANE, or install Go 1.26 for "
                "scripts/controlplane to build them"
            )
        out = subprocess.run([str(script)], stdout=subprocess.PIPE, text=True)
        if out.returncode != 0 or not out.stdout.strip():
            raise ControlPlaneUnavailable(f"scripts/controlplane failed (exit {out.returncode}; its output above)")
        bin_dir = Path(out.stdout.strip().splitlines()[-1])
    missing = [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if missing:
        raise ControlPlaneUnavailable(f"{bin_dir} lacks {', '.join(missing)} (scripts/controlplane builds them)")
    if shutil.which("openssl") is None:
        raise ControlPlaneUnavailable("openssl is needed for the control plane's certificates")
    if not (DEPLOY / "kustomization.yaml").is_file():
        raise ControlPlaneUnavailable(
            f"no {DEPLOY}/kustomization.yaml: the real control plane runs from spotd's source checkout"
        )
    return bin_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass
class RealCluster:
    """One control plane; `start()` returns when the API server answers, kwok runs and deploy/ is applied."""

    bin_dir: Path
    work: Path
    node_monitor_grace: str = "10s"
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    port: int = 0
    tokens: dict[str, str] = field(default_factory=dict)
    apiserver_args: tuple[str, ...] = ()  # more kube-apiserver flags (bench/bench_real_burst.py: an audit log)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.work / "ca.crt"

    # ---- start and stop --------------------------------------------------------------------------------

    def start(self, apply_deploy: bool = True) -> RealCluster:
        """Every component binds a port chosen before it starts: one taken meanwhile by another process (two
        suites on one machine) fails that component at once, and the whole start is tried again on new ports.
        (--secure-port=0 for the controller-manager and the scheduler was tried: in 2 of 4 loaded runs the
        dead-node test then saw its Terminating pods removed by kwok, never with the ports; not understood.)"""
        for attempt in range(3):
            try:
                return self._start(apply_deploy)
            except RuntimeError as exc:
                if "address already in use" not in str(exc) or attempt == 2:
                    raise
            self.stop()
            self.procs.clear()
            shutil.rmtree(self.work / "etcd", ignore_errors=True)
            for log in self.work.glob("*.log"):
                log.rename(log.with_suffix(f".log.{attempt}"))
        raise AssertionError("unreachable")

    def _start(self, apply_deploy: bool) -> RealCluster:
        self.work.mkdir(parents=True, exist_ok=True)
        self._certificates()
        self._token_file()
        etcd_port, peer_port = _free_port(), _free_port()
        self.port = _free_port()
        self._run(
            "etcd",
            "--name=spotd-test",
            f"--data-dir={self.work / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=spotd-test=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync",  # a throwaway store: no fsync wait on a loaded CI disk
            "--listen-metrics-urls=",
        )
        self._run(
            "kube-apiserver",
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.port}",
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",  # a loopback advertise address is refused by the reconciler
            f"--tls-cert-file={self.work / 'apiserver.crt'}",
            f"--tls-private-key-file={self.work / 'apiserver.key'}",
            f"--client-ca-file={self.ca_file}",
            f"--token-auth-file={self.work / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self.work / 'sa.key'}",
            f"--service-account-signing-key-file={self.work / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--allow-privileged=true",
            "--profiling=false",
            *self.apiserver_args,
        )
        self._wait_ready()
        self._write_kubeconfig(self.work / "admin.kubeconfig", self.tokens["admin"])
        for name in ("controller-manager", "scheduler", "kwok"):
            self._write_kubeconfig(self.work / f"{name}.kubeconfig", self.tokens[name])
        self._run(
            "kube-controller-manager",
            f"--kubeconfig={self.work / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1",
            f"--secure-port={_free_port()}",
            "--leader-elect=false",
            "--controllers=*",
            f"--service-account-private-key-file={self.work / 'sa.key'}",
            f"--root-ca-file={self.ca_file}",
            "--use-service-account-credentials=false",
            f"--node-monitor-grace-period={self.node_monitor_grace}",
            "--node-monitor-period=1s",
            "--profiling=false",
        )
        self._run(
            "kube-scheduler",
            f"--kubeconfig={self.work / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1",
            f"--secure-port={_free_port()}",
            "--leader-elect=false",
            "--profiling=false",
        )
        self._run(
            "kwok",
            f"--kubeconfig={self.work / 'kwok.kubeconfig'}",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            f"--disregard-status-with-label-selector={KUBELET_GONE_LABEL}=true",
            "--node-ip=127.0.0.1",  # nothing may send traffic off 127.0.0.0/8
            "--cidr=127.1.0.1/16",
            f"--server-address=127.0.0.1:{_free_port()}",
            "--node-lease-duration-seconds=10",
            f"--config={self.work / 'kwok.yaml'}",
        )
        self._wait_for(lambda: self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200)
        if apply_deploy:
            # deploy/ ships a PrometheusRule: a cluster with the Prometheus operator has its CRD
            self.apply(_PROMETHEUS_RULE_CRD)
            self._wait_for(lambda: self.request("GET", "/apis/monitoring.coreos.com/v1/prometheusrules")[0] == 200)
            self.kubectl("apply", "--server-side", "-k", str(DEPLOY))
        return self

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _run(self, binary: str, *args: str) -> None:
        log = open(self.work / f"{binary}.log", "ab")
        self.procs[binary] = subprocess.Popen(
            [str(self.bin_dir / binary), *args], stdout=log, stderr=subprocess.STDOUT, cwd=self.work
        )

    def _certificates(self) -> None:
        w = self.work
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", "ca.key", "-out", "ca.crt", "-days", "30", "-subj", "/CN=spotd-test-ca", cwd=w)  # fmt: skip
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", "apiserver.key", "-out", "apiserver.csr", "-subj", "/CN=kube-apiserver", cwd=w)  # fmt: skip
        (w / "san.ext").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc\n"
        )
        _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", "apiserver.crt", "-days", "30", "-extfile", "san.ext", cwd=w)  # fmt: skip
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=w)
        # kwok's default stages (node and pod lifecycles) come from the module when no Stage is configured
        (w / "kwok.yaml").write_text("kind: KwokConfiguration\napiVersion: config.kwok.x-k8s.io/v1alpha1\n")

    def _token_file(self) -> None:
        # Static tokens for the control plane's own clients and the tests' admin: system:masters stands for
        # the component roles a kubeadm cluster binds (the tests are not about the components' RBAC).
        users = {
            "admin": ("spotd-test-admin", "system:masters"),
            "controller-manager": ("system:kube-controller-manager", "system:masters"),
            "scheduler": ("system:kube-scheduler", "system:masters"),
            "kwok": ("kwok", "system:masters"),
        }
        lines = []
        for key, (user, group) in users.items():
            token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
            self.tokens[key] = token
            lines.append(f'{token},{user},{user},"{group}"')
        (self.work / "tokens.csv").write_text("\n".join(lines) + "\n")
        os.chmod(self.work / "tokens.csv", 0o600)

    def _wait_ready(self, timeout: float = 120.0) -> None:
        token = self.tokens["admin"]
        self._wait_for(lambda: self.request("GET", "/readyz", token=token)[0] == 200, timeout)

    def _wait_for(self, check: Any, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    tail = (self.work / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")
            try:
                if check():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the control plane was not ready within {timeout}s (logs in {self.work})")

    # ---- clients ---------------------------------------------------------------------------------------

    def write_kubeconfig_for(self, path: Path, token: str, namespace: str = "default") -> Path:
        return self._write_kubeconfig(path, token, namespace)

    def _write_kubeconfig(self, path: Path, token: str, namespace: str = "default") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "real", "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "real", "context": {"cluster": "real", "user": "user", "namespace": namespace}}],
            "current-context": "real",
        }
        path.write_text(json.dumps(config))
        os.chmod(path, 0o600)
        return path

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        out = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.work / 'admin.kubeconfig'}", *args],
            input=stdin,
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def request(
        self, method: str, path: str, body: Any = None, token: str | None = None, content_type: str | None = None
    ) -> tuple[int, Any]:
        """One HTTPS request as `token` (the admin's by default): (status, parsed JSON body or text)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {token or self.tokens['admin']}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type or "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def apply(self, *objects: dict[str, Any]) -> None:
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": list(objects)}))  # fmt: skip

    def add_node(self, name: str, labels: dict[str, str] | None = None, **spec: Any) -> None:
        """A kwok node: kwok reports it Ready and keeps its lease while it carries kwok's annotation. It gets
        the labels a kubelet sets on itself (kwok sets none): deploy/'s DaemonSet selects kubernetes.io/os."""
        kubelet = {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name}
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": kubelet | (labels or {}),
                    "annotations": {KWOK_ANNOTATION: "fake"},
                },
                "spec": spec,
            }
        )

    def service_account_token(
        self, namespace: str, account: str, *, bound_pod: dict[str, Any] | None = None, seconds: int = 3600
    ) -> str:
        """A TokenRequest token; bound to a pod, the server adds the node it runs on (the node-name claim)."""
        spec: dict[str, Any] = {"audiences": [], "expirationSeconds": seconds}
        if bound_pod is not None:
            meta = bound_pod["metadata"]
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]}
        status, body = self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        if status != 201:
            raise RuntimeError(f"TokenRequest for {namespace}/{account}: {status} {body}")
        return str(body["status"]["token"])

    def wait_for(self, check: Any, timeout: float = 60.0) -> None:
        self._wait_for(check, timeout)


def start_cluster(work: Path | None = None) -> RealCluster:
    work = work or Path(tempfile.mkdtemp(prefix="spotd-real-"))
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is needed for the control plane's certificates")
    return RealCluster(controlplane_binaries(), work).start()


def main() -> None:
    """Start a control plane, print its admin kubeconfig, run until SIGINT or SIGTERM."""
    cluster = start_cluster()
    print(f"kubeconfig: {cluster.work / 'admin.kubeconfig'}  (logs in {cluster.work}); Ctrl-C stops it", flush=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
