"""The controller's own Prometheus metrics. The names are used by the alert rules: keep them stable.

They live in the agent's registry (spotd.metrics.REGISTRY): one registry per process, one /metrics.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from spotd.common.metrics import REGISTRY

DRAIN_OUTCOMES = ("complete", "aborted_ice", "withdrawn", "timeout", "blocked", "failed")

LEADER = Gauge("spotd_leader", "1 while this process holds the controller lease.", ["identity"], registry=REGISTRY)
NODES = Gauge("spotd_nodes", "Nodes in the inventory by capacity type.", ["capacity_type"], registry=REGISTRY)
ON_DEMAND_OVER_AGE = Gauge(
    "spotd_on_demand_nodes_over_age",
    "On-demand nodes older than --min-on-demand-age (candidates to go back to Spot).",
    registry=REGISTRY,
)
ON_DEMAND_AGE = Histogram(
    "spotd_on_demand_node_age_seconds",
    "Age of on-demand nodes, observed once per node per decision pass.",
    buckets=(600, 1800, 3600, 7200, 14400, 28800, 86400, 172800, 604800),
    registry=REGISTRY,
)
OLDEST_ON_DEMAND_AGE = Gauge(
    "spotd_on_demand_oldest_node_age_seconds",
    "Age of the oldest on-demand node (0 when none).",
    registry=REGISTRY,
)
CONTROLLER_DRAINS = Counter(
    "spotd_controller_drains",
    "Drains of on-demand nodes by outcome (complete, aborted_ice, withdrawn, timeout, blocked, failed).",
    ["outcome"],
    registry=REGISTRY,
)
DECISION_PASS_SECONDS = Histogram(
    "spotd_decision_pass_seconds",
    "Time of one decision pass over the warm inventory.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2),
    registry=REGISTRY,
)
# Make-before-break (docs/controller.md): surges, where drained pods landed, cluster-autoscaler's ranking.
SURGE_OUTCOMES = ("ready", "failed")
SURGES = Counter(
    "spotd_surges",
    "Surges of placeholder pods before a drain, by outcome (ready: all ran on Spot; failed: the node was left).",
    ["outcome"],
    registry=REGISTRY,
)
LANDING_RESULTS = ("returned", "short", "unknown")
DRAIN_LANDINGS = Counter(
    "spotd_drain_landings",
    "Where the replacements of a drained node's pods ran: returned (all on Spot), short (one or more on "
    "on-demand: the pool is short), unknown (not all running by the timeout).",
    ["result"],
    registry=REGISTRY,
)
AUTOSCALER_SPOT_FIRST = Gauge(
    "spotd_autoscaler_spot_ranked_first",
    "1 when cluster-autoscaler's priority expander ranks a Spot group above every fallback group, 0 when "
    "not, -1 when its ConfigMap is absent or unreadable.",
    registry=REGISTRY,
)

for _outcome in SURGE_OUTCOMES:
    SURGES.labels(_outcome)
for _result in LANDING_RESULTS:
    DRAIN_LANDINGS.labels(_result)
for _outcome in DRAIN_OUTCOMES:
    CONTROLLER_DRAINS.labels(_outcome)
for _ctype in ("spot", "on-demand", "unknown"):
    NODES.labels(_ctype)

SCOPE_CONFIGURED = Gauge(
    "spotd_controller_scope_configured",
    "1 when fallback capacity is declared (--fallback-selector / --fallback-asg-tag); 0: nothing is drained.",
    registry=REGISTRY,
)
FALLBACK_NODES = Gauge(
    "spotd_fallback_nodes",
    "On-demand nodes in the declared fallback scope (the only ones ever drained).",
    registry=REGISTRY,
)
DRAINS_HELD = Gauge(
    "spotd_controller_drains_held",
    "1 while a drainable fallback node is held, by reason (pending_pods: Pending pods it would compete with).",
    ["reason"],
    registry=REGISTRY,
)
CAPACITY_SOURCE_READY = Gauge(
    "spotd_capacity_source_ready",
    "1 while a capacity source (the queue, or a Spot ASG's scaling activities) feeds the pool book; 0: none, "
    "no pool is read as Spot available and nothing is drained (the leader's only).",
    registry=REGISTRY,
)
SOURCE_READY = Gauge(
    "spotd_source_ready",
    "On the leader: 1 when the source's last read succeeded (sqs, activities, inventory).",
    ["source"],
    registry=REGISTRY,
)
SOURCE_LAST_READ = Gauge(
    "spotd_source_last_read_timestamp_seconds",
    "On the leader: when the source was last read successfully (the start of the term before the first read).",
    ["source"],
    registry=REGISTRY,
)
OUT_OF_SERVICE_TAINTS = Counter(
    "spotd_out_of_service_taints",
    "Nodes past their interruption deadline and NotReady given node.kubernetes.io/out-of-service, by outcome.",
    ["outcome"],
    registry=REGISTRY,
)
DRAINS_HELD.labels("pending_pods")
for _outcome in ("applied", "failed"):
    OUT_OF_SERVICE_TAINTS.labels(_outcome)
QUEUE_EVENTS = Counter(
    "spotd_queue_instance_events",
    "Instance events read from the queue (Spot warning, rebalance, state change, Health, lifecycle action), "
    "by kind and outcome (matched: a node of this cluster; foreign: no node of this cluster has the instance; "
    "rehearsal, rehearsal_refused: a `simulate-reclaim --via-queue` message for a node of this cluster).",
    ["kind", "outcome"],
    registry=REGISTRY,
)
TAKEOVER_OUTCOMES = ("acknowledged", "complete", "incomplete", "interrupted", "blocked", "dry_run", "failed")
TAKEOVERS = Counter(
    "spotd_controller_takeovers",
    "Queue notices whose node's agent did not acknowledge them in --agent-ack-timeout, so the controller "
    "drained the node itself, by outcome (acknowledged: the agent recorded it in time, or later, and took over).",
    ["outcome"],
    registry=REGISTRY,
)
for _outcome in TAKEOVER_OUTCOMES:
    TAKEOVERS.labels(_outcome)
LIFECYCLE_ACTIONS = Counter(
    "spotd_lifecycle_actions",
    "ASG lifecycle actions the controller ended or looked at, by transition (terminate, launch) and outcome "
    "(continue: completed with CONTINUE; gone: AWS had no such action any more; failed; dry_run; launch only: "
    "wait, the node not Ready yet, expired, the hook ran out before).",
    ["transition", "outcome"],
    registry=REGISTRY,
)
LIFECYCLE_HEARTBEATS = Counter(
    "spotd_lifecycle_heartbeats",
    "RecordLifecycleActionHeartbeat calls for terminate actions whose drain runs, by outcome (ok, gone, failed).",
    ["outcome"],
    registry=REGISTRY,
)
for _outcome in ("continue", "gone", "failed"):
    LIFECYCLE_ACTIONS.labels("terminate", _outcome)
for _outcome in ("ok", "gone", "failed"):
    LIFECYCLE_HEARTBEATS.labels(_outcome)
