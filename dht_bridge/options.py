"""Options declared once: flag, `RMA_*` variable, type, default and help.

Every process builds its command line and its environment fallback from an `OptionTable`, and
the docs' table of variables is generated from the same tables, so the three cannot drift.
Precedence is the same everywhere: a given option, then a non-empty variable, then the default.
Tuning internals are not options: they are named constants beside the code they tune.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from dht_bridge.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "Option",
    "OptionKind",
    "OptionTable",
    "Values",
    "parse_hostport",
]

ENV_PREFIX = "RMA_"

# str, int, float and bool are scalars; list and peers are comma-separated, and repeatable on
# the command line (a given option replaces the variable's list, never adds to it).
OptionKind = Literal["str", "int", "float", "bool", "list", "peers"]
_LISTS = ("list", "peers")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

Values = dict[str, Any]


def parse_hostport(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` to a tuple; ValueError names the bad input."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)


def format_hostport(host: str, port: int) -> str:
    """`parse_hostport`'s inverse, for messages: `host:port`, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Option:
    """One setting: its key in the resolved values, its variable (without `RMA_`), its help.

    `env` None: a per-run argument (which service to flush) that has no variable."""

    dest: str
    env: str | None
    help: str
    kind: OptionKind = "str"
    default: Any = None
    # The command-line spelling; by default `--` and the key with dashes.
    flag: str | None = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    # What `--help` and the docs show when the default is not a plain value.
    shown: str | None = None

    @property
    def variable(self) -> str | None:
        """The environment variable's full name."""
        return None if self.env is None else ENV_PREFIX + self.env

    @property
    def option_string(self) -> str:
        """The command-line flag."""
        return self.flag or "--" + self.dest.replace("_", "-")

    def with_default(self, default: Any, shown: str | None = None) -> Option:
        """The same option with another process's default (a worker binds 0.0.0.0)."""
        return replace(self, default=default, shown=shown)

    def with_help(self, help: str) -> Option:
        """The same option explained for another process."""
        return replace(self, help=help)

    def with_flag(self, flag: str) -> Option:
        """The same option under another flag (`rma node --port` is the DHT port)."""
        return replace(self, flag=flag)

    def default_text(self) -> str:
        """The default as `--help` and the docs show it."""
        if self.shown is not None:
            return self.shown
        if self.default is None or self.default in ((), ""):
            return "none"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, tuple):
            return ",".join(_join_peer(item) for item in self.default)
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default)

    def add_to(self, parser: argparse._ActionsContainer) -> None:
        """Add this option's flag; its default stays None so an absent flag falls through."""
        where = f"{self.variable}; " if self.variable else ""
        text = f"{self.help} [{where}default: {self.default_text()}]"
        kwargs: dict[str, Any] = {"dest": self.dest, "default": None, "help": text}
        if self.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif self.kind in _LISTS:
            kwargs["action"] = "append"
            kwargs["metavar"] = self.metavar or ("HOST:PORT" if self.kind == "peers" else "NAME")
        else:
            kwargs["type"] = {"int": int, "float": _finite_float}.get(self.kind, str)
            if self.metavar:
                kwargs["metavar"] = self.metavar
        if self.choices:
            kwargs["choices"] = self.choices
        parser.add_argument(self.option_string, **kwargs)

    def from_text(self, text: str) -> Any:
        """The value a variable's text stands for; ConfigError names the variable."""
        try:
            return self._convert(text)
        except ValueError as exc:
            raise ConfigError(f"{self.variable}={text!r}: {exc}") from None

    def from_flag(self, given: Any) -> Any:
        """The value a given flag stands for (argparse typed the scalars already)."""
        if self.kind not in _LISTS:
            return given
        try:
            return self._items([part for item in given for part in str(item).split(",")])
        except ValueError as exc:
            raise ConfigError(f"{self.option_string}: {exc}") from None

    def _convert(self, text: str) -> Any:
        text = text.strip()
        if self.kind == "int":
            return _number(int, text, "an integer")
        if self.kind == "float":
            return _number(float, text, "a number")
        if self.kind == "bool":
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError("is not a boolean (1/true/yes/on or 0/false/no/off)")
        if self.kind in _LISTS:
            return self._items(text.split(","))
        if self.choices and text not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}")
        return text

    def _items(self, items: Sequence[str]) -> tuple[Any, ...]:
        stripped = [item.strip() for item in items if item.strip()]
        if self.kind == "peers":
            return tuple(parse_hostport(item) for item in stripped)
        return tuple(stripped)


def _number(kind: type[int] | type[float], text: str, what: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"is not {what}") from None
    # float() reads "nan" and "inf": no timeout, interval or share means either.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"is not {what}: it must be finite")
    return value


def _finite_float(text: str) -> float:
    """argparse's type for float flags: as `float`, without nan and inf."""
    try:
        return float(_number(float, text, "a number"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} {exc}") from None


def _join_peer(item: Any) -> str:
    return f"{item[0]}:{item[1]}" if isinstance(item, tuple) else str(item)


class OptionTable:
    """The options of one process, in the order `--help` and the docs list them."""

    def __init__(self, *options: Option | OptionTable) -> None:
        flat: list[Option] = []
        for item in options:
            flat.extend(item if isinstance(item, OptionTable) else (item,))
        dests = [option.dest for option in flat]
        duplicates = {dest for dest in dests if dests.count(dest) > 1}
        if duplicates:
            raise ValueError(f"options declared twice: {', '.join(sorted(duplicates))}")
        self._options = tuple(flat)

    def __iter__(self) -> Iterator[Option]:
        return iter(self._options)

    def __getitem__(self, dest: str) -> Option:
        for option in self._options:
            if option.dest == dest:
                return option
        raise KeyError(dest)

    def replacing(self, *options: Option) -> OptionTable:
        """This table with some options swapped for variants (same dest)."""
        swap = {option.dest: option for option in options}
        missing = set(swap) - {option.dest for option in self._options}
        if missing:
            raise KeyError(f"no such options: {', '.join(sorted(missing))}")
        return OptionTable(*(swap.get(option.dest, option) for option in self._options))

    def add_to(self, parser: argparse._ActionsContainer) -> None:
        """Add every option's flag to `parser`."""
        for option in self._options:
            option.add_to(parser)

    def resolve(
        self, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> Values:
        """Each option's value: the given flag, else the non-empty variable, else the default."""
        environ = os.environ if environ is None else environ
        given = vars(args) if args is not None else {}
        values: Values = {}
        for option in self._options:
            flag = given.get(option.dest)
            text = environ.get(option.variable, "") if option.variable else ""
            if flag is not None:
                values[option.dest] = option.from_flag(flag)
            elif text.strip():
                values[option.dest] = option.from_text(text)
            else:
                values[option.dest] = option.default
        return values
