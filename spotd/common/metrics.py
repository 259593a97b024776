"""The process's one Prometheus registry (one /metrics), and the loop error counter every program uses.

Each package keeps its own instruments on this registry in its metrics module; metric names are the alert
rules' contract (deploy/rules): keep them stable."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

REGISTRY = CollectorRegistry(auto_describe=True)

LOOP_ERRORS = Counter(
    "spotd_loop_errors",
    "Unexpected errors caught in a loop, which then carried on.",
    ["loop"],
    registry=REGISTRY,
)
