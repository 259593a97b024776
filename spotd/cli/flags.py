"""Flag types and SPOTD_* environment defaults. Nothing else lives here.

Every flag also reads SPOTD_<FLAG_IN_UPPER_SNAKE>; a flag on the command line wins. A bad value, from
either, stops the program at start with one line naming the flag (and the variable) and the problem.
"""

from __future__ import annotations

import argparse
import os
from typing import NoReturn

from spotd.common.parsing import parse_duration, parse_host_port


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
