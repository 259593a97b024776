"""The fallback rehearsal twice, side by side: the controller as configured, and with other flags.

    .venv/bin/python bench/bench_fallback.py [--a "FLAGS"] [--b "--surge-timeout 0"] [-- simulate-reclaim flags]

Each side is one `spotd simulate-reclaim --scenario fallback --output json` (a subprocess, one after the
other: the machine is shared), its controller given the side's flags through --controller-arg. Prints the
report's figures at real scale in two columns. A side whose flags the controller does not know (say
--surge-timeout before make-before-break exists) is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from typing import Any

from spotd.rehearsal.running_controller import controller_options

ROWS = (
    ("on-demand node-hours", lambda r: f"{r['on_demand_node_hours']:.2f}"),
    ("  after Spot restored", lambda r: f"{r['on_demand_node_hours_after_restore']:.2f}"),
    ("fallback nodes (max at once)", lambda r: f"{r['fallback_nodes']} ({r['max_fallback_nodes']})"),
    ("back on Spot at", lambda r: "-" if r["returned_at"] is None else f"+{r['returned_at'] / 60:.1f} min"),
    ("longest Pending", lambda r: f"{r['pending_max']:.0f} s"),
    ("  after Spot restored", lambda r: f"{r['pending_after_restore_max']:.0f} s"),
    ("p95 Pending", lambda r: f"{r['pending_p95']:.0f} s"),
    ("still Pending at end", lambda r: str(r["pending_at_end"])),
    ("disruptions: reclaim", lambda r: str(sum(w["by_cause"]["reclaim"] for w in r["workloads"] if w["counted"]))),
    ("disruptions: return", lambda r: str(sum(w["by_cause"]["return"] for w in r["workloads"] if w["counted"]))),
    ("disruptions: other", lambda r: str(sum(w["by_cause"]["other"] for w in r["workloads"] if w["counted"]))),
)


def run_side(flags: list[str], extra: list[str]) -> tuple[dict[str, Any] | None, str, float]:
    known = controller_options()
    unknown = [f.split("=", 1)[0] for f in flags if f.startswith("--") and f.split("=", 1)[0] not in known]
    if unknown:
        return None, f"skipped: the controller has no {', '.join(unknown)}", 0.0
    argv = [sys.executable, "-m", "spotd", "simulate-reclaim", "--scenario", "fallback", "--output", "json"]
    argv += [f"--controller-arg={f}" for f in flags] + extra
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    try:
        return json.loads(done.stdout), "", elapsed
    except ValueError:
        return None, f"failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}", elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", default="", help="controller flags of side A (default: none)")
    parser.add_argument("--b", default="--surge-timeout 0", help="controller flags of side B (--surge-timeout 0)")
    parser.add_argument("rest", nargs="*", help="flags for simulate-reclaim, after --")
    args = parser.parse_args()
    sides = []
    for label, text in (("A", args.a), ("B", args.b)):
        flags = shlex.split(text)
        print(f"side {label}: spotd controller {' '.join(flags) or '(defaults)'} ...", file=sys.stderr, flush=True)
        sides.append((label, flags, *run_side(flags, args.rest)))
    width = 30
    for label, f, *_ in sides:
        print(f"{label}: spotd controller {' '.join(f) or '(defaults)'}")
    print(f"{'':{width}}" + "".join(f"{label:44}" for label, *_ in sides))
    for name, cell in ROWS:
        values = [cell(r) if r is not None else why for _, _, r, why, _ in sides]
        print(f"{name:{width}}" + "".join(f"{v[:42]:44}" for v in values))
    print(f"{'wall time':{width}}" + "".join(f"{elapsed:.0f} s".ljust(44) for *_, elapsed in sides))
    for label, _, r, why, _ in sides:
        print(f"{label}: " + (("OK: " if r["ok"] else "NOT OK: ") + r["verdict"] if r is not None else why))
    return 0


if __name__ == "__main__":
    sys.exit(main())
