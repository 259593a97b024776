"""A fake Kubernetes API server (plain HTTP on 127.0.0.1, no auth) for tests and the embedded cluster.

kubectl 1.32 (get, cordon, uncordon, taint, label, annotate, drain, delete --wait, get -w), the official
Python client and lightkube work against it. Usage:

    api = FakeApiServer(termination_scale=0.1)
    await api.start(); api.write_kubeconfig(path)
    api.create({...}); api.get("Pod", "web-0", "default"); api.inject_fault("POST", r"/eviction$", 429)
    async for event_type, obj in api.subscribe(): ...
    await api.stop()

What it does not do (know this before trusting a green test):
- no admission, no schema validation, no defaulting beyond pods (grace 30 s, phase Pending) and namespaces;
  namespaces are not enforced, finalizers and ownerReferences garbage collection are ignored, deleting a
  Node leaves its pods (no pod GC), no kubelet: pods change phase/readiness only when someone writes them;
- lists always answer from the current state (resourceVersion/resourceVersionMatch ignored), and a
  `continue` token resumes by key on the current state rather than on a snapshot;
- watches replay from a global history of `history_size` changes (then 410 Expired); bookmarks every
  `bookmark_interval` seconds when asked;
- server-side apply is a strategic merge (no field ownership, fields dropped from the applied object stay);
  strategic merge knows the merge keys of the built-in lists by field name (containers, env, volumes,
  conditions, ...), other lists are replaced;
- PDB expected pods: the scale of the pods' controllers (ReplicaSet, Deployment, StatefulSet) when found in
  the store, else one per pod (the real controller reports an error for pods without a scalable owner);
- protobuf request bodies (kubectl's typed clients) are decoded for DeleteOptions and Namespace only, other
  kinds get 415; responses are always JSON;
- the synchronous helpers (create/get/list/update/delete) are not thread-safe: call them from the loop's
  thread; they return copies, and `store` gives the live objects (never mutate those while watches run).
"""

from .auth import ADMIN, AdmissionAttributes, UserInfo
from .errors import ApiError
from .policy import STOP_SECONDS_ANNOTATION
from .rbac import AccessRecord
from .server import ADMIN_TOKEN, FakeApiServer, RecordedRequest

__all__ = [
    "ADMIN",
    "ADMIN_TOKEN",
    "STOP_SECONDS_ANNOTATION",
    "AccessRecord",
    "AdmissionAttributes",
    "ApiError",
    "FakeApiServer",
    "RecordedRequest",
    "UserInfo",
]
