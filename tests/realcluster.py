"""The real control plane for the tests: spotd/sim/controlplane.py (moved there so that
`spotd simulate-reclaim --embedded --control-plane DIR` can start it too); these names stay importable here.

    python -m tests.realcluster          # start it, print a kubeconfig path, stop on Ctrl-C
"""

from __future__ import annotations

from spotd.sim.controlplane import (
    DEPLOY,
    KUBELET_GONE_LABEL,
    KWOK_ANNOTATION,
    ROOT,
    RealCluster,
    controlplane_binaries,
    main,
    start_cluster,
)

__all__ = [
    "DEPLOY",
    "KUBELET_GONE_LABEL",
    "KWOK_ANNOTATION",
    "ROOT",
    "RealCluster",
    "controlplane_binaries",
    "start_cluster",
]

if __name__ == "__main__":
    main()
