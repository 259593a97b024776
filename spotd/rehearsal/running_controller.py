"""The real `spotd controller` as a subprocess of a rehearsal: its flags at the rehearsal's time scale, its
start (until ready) and stop.

The controller is run through its command line only, so a rehearsal depends on its flags and on nothing
inside it: the duration flags are found from the controller's own parser (argparse's `_actions`: the one
place that lists them), scaled, and a flag it does not have yet (--fallback-selector) is passed only when
it has it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spotd.common.parsing import parse_duration
from spotd.rehearsal.targets import RehearsalRefused

# duration flags left at their value: leases, the SQS long poll, the Alertmanager and watch timeouts are plumbing
UNSCALED_FLAGS = re.compile(r"^--(lease-.*|sqs-wait|alertmanager-timeout|watch-timeout)$")
_DURATION_DEFAULT = re.compile(r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)(\d+(\.\d+)?\s*(ms|s|m|h))*\s*$")


def controller_options() -> dict[str, Any]:
    """`spotd controller`'s flags as its own parser declares them: option string -> default."""
    from spotd.cli.main import build_parser

    parser = build_parser(only="controller")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = sub.choices["controller"]
    return {opt: action.default for action in command._actions for opt in action.option_strings}


def scaled_duration_flags(options: dict[str, Any]) -> dict[str, float]:
    """The controller's duration flags that the time scale applies to: flag -> real default in seconds."""
    out = {}
    for flag, default in options.items():
        if isinstance(default, str) and _DURATION_DEFAULT.match(default) and not UNSCALED_FLAGS.match(flag):
            out[flag] = parse_duration(default)
    return out


def _seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") + "s"


def controller_argv(
    options: dict[str, Any], user_args: Sequence[str], scale: float, base: Sequence[str], fallback_selector: str
) -> tuple[list[str], list[str]]:
    """(argv after `spotd controller`, notes): base flags, every duration flag at its default times scale,
    --fallback-selector when the controller has it, then the user's flags (durations scaled too; given last,
    they win)."""
    durations = scaled_duration_flags(options)
    argv = list(base)
    notes = []
    for flag, real in sorted(durations.items()):
        argv += [flag, _seconds(real * scale)]
    if "--fallback-selector" in options:
        argv += ["--fallback-selector", fallback_selector]
        notes.append(f"controller run with --fallback-selector {fallback_selector}")
    else:
        notes.append("this controller has no --fallback-selector: it considers every on-demand node")
    args = list(user_args)
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in durations:
            if eq:
                args[i] = f"{flag}={_seconds(parse_duration(value) * scale)}"
            elif i + 1 < len(args):
                args[i + 1] = _seconds(parse_duration(args[i + 1]) * scale)
                i += 1
        i += 1
    if user_args:
        notes.append("controller flags given: " + " ".join(user_args))
    return argv + args, notes


class ControllerProcess:
    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.port = 0  # bound by the controller (--listen 127.0.0.1:0), read from its `listening` line
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 60.0) -> None:
        log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "spotd", "controller", *self.argv, env=self.env, stdout=log, stderr=log
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self._ready):
            if self.proc.returncode is not None:
                lines = self.log_path.read_text(errors="replace").strip().splitlines() or [""]
                raise RehearsalRefused(
                    f"spotd controller exited with {self.proc.returncode} ({lines[-1][:300]}); log: {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise RehearsalRefused(f"spotd controller not ready after {timeout:.0f}s: see {self.log_path}")
            await asyncio.sleep(0.2)
        # ready = lease and inventory; the capacity sources' first read follows: wait for it (best effort)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and b"sources_ready" not in self.log_path.read_bytes():  # noqa: ASYNC110 - a file has no event
            await asyncio.sleep(0.1)

    def _ready(self) -> bool:
        if not self.port:
            self.port = _listening_port(self.log_path)
            if not self.port:
                return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    async def stop(self) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(10):  # not wait_for: on 3.11 it can swallow our caller's cancellation
                return await self.proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            return await self.proc.wait()


def _listening_port(log_path: Path) -> int:
    """The port in the controller's `listening` log line (JSON), 0 before it has written it."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return 0
    for line in text.splitlines():
        if '"listening"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "listening" and entry.get("port"):
            return int(entry["port"])
    return 0
