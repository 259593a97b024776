"""A fake Kubernetes API server (HTTPS on 127.0.0.1, bearer tokens, RBAC) for tests and the embedded cluster.

kubectl 1.32 (get, cordon, uncordon, taint, label, annotate, drain, delete --wait, get -w, auth can-i), the
official Python client and lightkube work against it. Usage:

    api = FakeApiServer(termination_scale=0.1)
    await api.start(); api.write_kubeconfig(path)          # the admin's token: everything allowed
    api.load_manifests([Path("deploy")])                    # RBAC (and the rest) as `kubectl apply -k deploy/`
    token = api.service_account_token("spotd", "spotd-agent", node_name="node-a")
    api.write_kubeconfig(agent_path, token=token)           # the agent as its real identity
    api.create({...}); api.get("Pod", "web-0", "default"); api.inject_fault("POST", r"/eviction$", 429)
    api.admission_hooks.append(hook)                        # hook(AdmissionAttributes) raises ApiError to deny
    async for event_type, obj in api.subscribe(): ...
    await api.stop()

Requests are authenticated (401 without a known bearer token, except /healthz, /livez, /readyz and /version),
then authorized by RBAC from the Roles, ClusterRoles and bindings in the store plus the bootstrap policy
(discovery, health and self reviews for everyone authenticated; everything for system:masters); every
decision lands in `access_log` (and in the session collectors of `FakeApiServer.access_sinks`), then
injected faults apply, then the request is served; writes pass the admission hooks before they are stored.

What it does not do (know this before trusting a green test):
- the synchronous helpers (create/get/list/update/delete/load_manifests) bypass authentication,
  authorization, admission and the access log: they are the test's own hand, not a client;
- authentication: static tokens only, none expires, no client certificates, no impersonation headers,
  no TokenReview/SelfSubjectReview; a service-account token is valid whether or not its ServiceAccount,
  pod or node exists; the serving certificate is self-signed for 127.0.0.1 and localhost;
- authorization: RBAC only (no Node authorizer, no webhook), no aggregated ClusterRoles, no escalation or
  bind checks on writes of roles and bindings; SelfSubjectAccessReview is answered, SelfSubjectRulesReview
  is not; a 403 comes before the 404 the handler would give, as on a real server;
- admission: the built-in NamespaceLifecycle (404 for a write into a missing namespace, 403 for a create in
  a Terminating one, the immortal namespaces) and Priority (spec.priority and preemptionPolicy from the
  PriorityClass, 403 for an unknown one; the system classes exist) plugins (plugins.py), then the hooks you
  add; no LimitRanger, ServiceAccount, NodeRestriction, ResourceQuota or webhooks. Pods are defaulted and
  their container resources validated as kube-apiserver does (strategy.py: a GPU request without an equal
  limit is a 422); no other schema validation; a deleted namespace is Terminating while the namespace
  controller (namespaces.py) deletes its content and waits for what finalizers or graceful deletions hold,
  then goes; ownerReferences garbage collection is ignored; finalizers hold any object (a
  DELETE marks it, the update removing the last one deletes it);
- pods: a graceful deletion ends only on a node that exists and is Ready (its kubelet: policy.py), else the
  pod stays Terminating; the taint manager and pod GC (terminating pods of an out-of-service NotReady node,
  pods of a deleted Node) and the cordon's node.kubernetes.io/unschedulable taint as podgc.py says; no other
  node lifecycle controller (nothing turns a node NotReady) and no other kubelet: pods change phase/readiness
  only when someone writes them;
- lists always answer from the current state (resourceVersion/resourceVersionMatch ignored), and a
  `continue` token resumes by key on the current state rather than on a snapshot;
- watches replay from a global history of `history_size` changes (then 410 Expired); bookmarks every
  `bookmark_interval` seconds when asked;
- server-side apply is a strategic merge (no field ownership, fields dropped from the applied object stay);
  strategic merge knows the merge keys of the built-in lists by field name (containers, env, volumes,
  conditions, ...), other lists are replaced;
- PDB status follows the pods `pdb_lag` seconds (wall clock, default 0.05; 0 recomputes before every read)
  after the change, coalescing the changes in between; a new PDB has no status until then, so evictions
  against it get 429 as on a real cluster. Evictions check the status and decrement disruptionsAllowed,
  recording the pod in disruptedPods (counted unhealthy until it terminates or 2 minutes pass);
- PDB expected pods as the disruption controller computes them: an integer minAvailable counts the pods;
  maxUnavailable and a percentage minAvailable sum the scales of the pods' controllers (ReplicaSet,
  Deployment, StatefulSet, matched by uid), leave pods without a controller out (all bare: 0 expected, no
  disruption allowed), and fail safe (disruptionsAllowed 0, condition reason SyncFailed) for a controller
  without /scale (Job, DaemonSet, any custom resource) or one that is gone; no UnmanagedPods Events;
- protobuf request bodies (kubectl's typed clients) are decoded for DeleteOptions, Namespace and
  SelfSubjectAccessReview only, other kinds get 415; responses are always JSON;
- load_manifests renders a kustomization's resources, namespace, labels and images only, and skips kinds
  the fake does not serve (PrometheusRule);
- the synchronous helpers are not thread-safe: call them from the loop's thread; they return copies, and
  `store` gives the live objects (never mutate those while watches run).
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
