"""argv -> command: builds the parser of the command that runs (importing only that command) and runs it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import signal
import sys
from collections.abc import Sequence
from typing import Any

from spotd import __version__
from spotd.cli.flags import OneLineParser, apply_env_defaults

COMMANDS = {
    "agent": "per-node agent: act on Spot interruption and other notices (DaemonSet)",
    "controller": "move on-demand fallback back to Spot once capacity returns (Deployment)",
    "simulate-reclaim": "rehearse a reclaim on a cluster, or on an embedded simulated one",
    "status": "per node: notice or drain, and why each on-demand node is still here (read-only)",
    "version": "print the version",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of the command `only` (so the agent never imports the controller's modules:
    it runs on every node and every megabyte counts)."""
    parser = OneLineParser(prog="spotd", description="Spot-lifecycle daemon for Kubernetes on AWS.")
    parser.add_argument("--version", action="version", version=f"spotd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, help_text in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == "version" or only != name:  # `spotd --help` lists the commands without importing them
            continue
        _program(name).add_arguments(command)
        command.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
        apply_env_defaults(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    try:
        return _run(argv, command)
    except ModuleNotFoundError as exc:
        line = missing_dependency(command, exc)
        if line is None:  # one of our own modules: a broken install, the traceback says where
            raise
        print(line, file=sys.stderr)
        return 1


def missing_dependency(command: str | None, exc: ModuleNotFoundError) -> str | None:
    """The one line for a command whose library is not installed (`spotd controller` in the agent image,
    which has no boto3 or aiohttp); None when the missing module is spotd's own."""
    top = (exc.name or "").split(".")[0]
    if not top or top == "spotd":
        return None
    package = "spotd[aws]" if top in ("boto3", "botocore") else "spotd"
    prog = f"spotd {command}" if command else "spotd"
    return (
        f"{prog}: error: {top} is not installed here, and this command needs it (the agent image "
        f"ghcr.io/spotd/spotd-agent holds `spotd agent` only: use ghcr.io/spotd/spotd, or install {package})"
    )


def _run(argv: list[str], command: str | None) -> int:
    # `kill -USR1 <pid>`: every thread's Python stack to stderr (the pod log), for a process that looks hung;
    # not when stderr is no file (run in-process, under a capture)
    with contextlib.suppress(AttributeError, OSError, ValueError, RuntimeError):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "version":
        print(f"spotd {__version__}")
        return 0
    program = _program(args.command)
    try:
        config = program.config_from_args(args)
    except ValueError as exc:  # found invalid after parsing (files, combinations): still one line
        print(f"spotd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return int(asyncio.run(program.run(config)) or 0)
    except KeyboardInterrupt:
        return 130


def _program(command: str) -> Any:
    """The module of a command, imported only when that command runs."""
    import importlib

    modules = {
        "agent": "spotd.agent.main",
        "controller": "spotd.controller.main",
        "simulate-reclaim": "spotd.rehearsal.command",
        "status": "spotd.status.command",
    }
    return importlib.import_module(modules[command])


if __name__ == "__main__":
    sys.exit(main())
