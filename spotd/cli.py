"""Argument parsing with environment defaults, and subcommand dispatch. Nothing else lives here.

Every flag also reads SPOTD_<FLAG_IN_UPPER_SNAKE>; a flag on the command line wins. A bad value, from
either, stops the program at start with one line naming the flag (and the variable) and the problem.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from spotd import __version__
from spotd.parsing import parse_duration, parse_host_port


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage and the error on two lines; a start-up failure should be one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_duration(text: str) -> float:
    value = duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than zero")
    return value


def host_port(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def env_name(action: argparse.Action) -> str | None:
    longs = [o for o in action.option_strings if o.startswith("--")]
    if not longs:
        return None
    return "SPOTD_" + longs[0][2:].upper().replace("-", "_")


def apply_env_defaults(parser: argparse.ArgumentParser, environ: dict[str, str] | None = None) -> None:
    """Turn SPOTD_* variables into defaults, checking them now so a bad one fails with its name."""
    env = os.environ if environ is None else environ
    for action in parser._actions:
        name = env_name(action)
        if name is None or name not in env or isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        raw = env[name]
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            lowered = raw.strip().lower()
            if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
                parser.error(f"{name} ({action.option_strings[-1]}): {raw!r} is not a boolean")
            truthy = lowered in ("1", "true", "yes", "on")
            action.default = truthy if isinstance(action, argparse._StoreTrueAction) else not truthy
            continue
        values = (
            [v.strip() for v in raw.split(",") if v.strip()] if isinstance(action, argparse._AppendAction) else [raw]
        )
        converted = []
        for value in values:
            try:
                converted.append(action.type(value) if callable(action.type) else value)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                parser.error(f"{name} ({action.option_strings[-1]}): {exc}")
            if action.choices is not None and converted[-1] not in action.choices:
                choices = ", ".join(map(str, action.choices))
                parser.error(f"{name} ({action.option_strings[-1]}): {value!r} is not one of {choices}")
        action.default = converted if isinstance(action, argparse._AppendAction) else converted[0]
        action.required = False


COMMANDS = {
    "agent": "per-node agent: act on Spot interruption and other notices (DaemonSet)",
    "controller": "move on-demand fallback back to Spot once capacity returns (Deployment)",
    "simulate-reclaim": "rehearse a reclaim on a cluster, or on an embedded simulated one",
    "version": "print the version",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of the command `only` (so the agent never imports the controller's modules:
    it runs on every node and every megabyte counts)."""
    from spotd.alerts import add_alert_arguments

    parser = OneLineParser(prog="spotd", description="Spot-lifecycle daemon for Kubernetes on AWS.")
    parser.add_argument("--version", action="version", version=f"spotd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, help_text in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == "version" or only != name:  # `spotd --help` lists the commands without importing them
            continue
        _program(name).add_arguments(command)
        if name in ("agent", "controller"):
            add_alert_arguments(command)
        command.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
        apply_env_defaults(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=next((a for a in argv if a in COMMANDS), None))
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

    return importlib.import_module(
        {"agent": "spotd.agent", "controller": "spotd.controller", "simulate-reclaim": "spotd.simulate"}[command]
    )


if __name__ == "__main__":
    sys.exit(main())
