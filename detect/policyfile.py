"""Egress policy files (``--egress-policy FILE``, TOML): what --egress-allow,
--resolver and --egress-check-loopback say, per sandbox, in one file that can be re-read
while tracing.

    # every sandbox not named below
    [default]
    allow = ["pypi.org:443", "*.pythonhosted.org:443", "10.0.0.0/8"]
    resolvers = ["192.0.2.53"]       # the only DNS servers (default: resolv.conf's)
    check_loopback = false           # true: loopback connects are judged by `allow` too

    # one sandbox (its id as events name it: quote ids with / or . in them)
    [sandbox."/sandtrace/ci"]
    allow = ["github.com:443", "*.githubusercontent.com:443"]
    # resolvers and check_loopback not given: the [default] table's

A sandbox table replaces the default's `allow` when it has one, and takes the default's
`resolvers` and `check_loopback` unless it has its own. Without a [default] table, sandboxes
not named are not checked. Every problem in a file is reported at once, each naming the
file, the table and the key, and what is expected.

Pure: text in, policies out (reading the file is `read_policy_file`, the only I/O here).
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from detect.egress import (
    EgressPolicies,
    EgressPolicy,
    Network,
    PortRanges,
    Resolver,
    parse_destination,
    parse_resolver,
)

T = TypeVar("T")


class PolicyFileError(ValueError):
    """A policy file that cannot be used: every problem found, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_KEYS = {
    "allow": "an array of strings: allow-list entries (pypi.org, *.example.org:443, "
    "192.0.2.0/24, [2001:db8::/32]:53)",
    "resolvers": "an array of strings: DNS servers' addresses (192.0.2.53, 2001:db8::53)",
    "check_loopback": "true or false",
}
_TABLES = "[default] and [sandbox.NAME] tables"


@dataclass(slots=True)
class _Table:
    """One table's settings as given (None: not given)."""

    allow: list[tuple[Network | str, PortRanges]] | None = None
    resolvers: list[Resolver] | None = None
    check_loopback: bool | None = None


def _table(where: str, value: object, problems: list[str]) -> _Table:
    """The settings of one table; a problem for each bad key or entry (each bad entry of an
    array on its own, so that a file is fixed in one pass)."""
    out = _Table()
    if not isinstance(value, dict):
        problems.append(f"{where}: is {_toml_type(value)}; expected a table")
        return out
    for key, item in value.items():
        at = f"{where} {key}"
        if key not in _KEYS:
            problems.append(f"{at}: unknown key (expected one of {', '.join(_KEYS)})")
        elif key == "check_loopback":
            if isinstance(item, bool):
                out.check_loopback = item
            else:
                problems.append(f"{at}: {item!r} is {_toml_type(item)}; expected {_KEYS[key]}")
        elif not isinstance(item, list):
            problems.append(f"{at}: {item!r} is {_toml_type(item)}; expected {_KEYS[key]}")
        elif key == "allow":
            out.allow = _each(at, item, parse_destination, problems, quote=True)
        else:
            out.resolvers = _each(at, item, parse_resolver, problems, quote=False)
    return out


def _each(
    at: str, items: list[Any], parse: Callable[[str], T], problems: list[str], *, quote: bool
) -> list[T]:
    """Each string of a TOML array parsed; a problem per item that is not a string or does
    not parse (`quote`: its text before the reason, where the reason does not name it)."""
    out: list[T] = []
    for i, spec in enumerate(items):
        if not isinstance(spec, str):
            problems.append(f"{at}[{i}]: {spec!r} is {_toml_type(spec)}; expected a string")
            continue
        try:
            out.append(parse(spec))
        except ValueError as exc:
            problems.append(f"{at}[{i}]: {spec!r}: {exc}" if quote else f"{at}[{i}]: {exc}")
    return out


def _toml_type(value: object) -> str:
    return {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def parse_policy(data: dict[str, Any], source: str) -> EgressPolicies:
    """The policies of a policy file's parsed TOML (`source` names it in messages).
    PolicyFileError lists every problem."""
    problems: list[str] = []
    default: _Table | None = None
    sandboxes: dict[str, _Table] = {}
    for name, value in data.items():
        if name == "default":
            default = _table(f"{source}: [default]", value, problems)
        elif name == "sandbox":
            if not isinstance(value, dict):
                problems.append(
                    f"{source}: sandbox: is {_toml_type(value)}; expected [sandbox.NAME] tables"
                )
                continue
            for sandbox, table in value.items():
                where = f"{source}: [sandbox.{toml_key(sandbox)}]"
                sandboxes[sandbox] = _table(where, table, problems)
        else:
            problems.append(f"{source}: [{name}]: unknown table (expected {_TABLES})")
    if default is not None and default.allow is None:
        problems.append(
            f"{source}: [default]: no allow key (expected allow = [...]; an empty array "
            "allows no destination but loopback)"
        )
    for sandbox, table in sandboxes.items():
        if table.allow is None and (default is None or default.allow is None):
            problems.append(
                f"{source}: [sandbox.{toml_key(sandbox)}]: no allow key and no [default] allow "
                "to take (expected allow = [...] in either)"
            )
    if not data:
        problems.append(f"{source}: no table (expected {_TABLES})")
    if problems:
        raise PolicyFileError(problems)
    base = default or _Table()

    def policy(table: _Table) -> EgressPolicy:
        loopback = table.check_loopback
        if loopback is None:
            loopback = bool(base.check_loopback)
        allow = table.allow if table.allow is not None else base.allow or []
        resolvers = table.resolvers if table.resolvers is not None else base.resolvers or []
        return EgressPolicy.of(allow, allow_loopback=not loopback).with_resolvers(resolvers)

    return EgressPolicies(
        default=policy(default) if default is not None else None,
        per_sandbox={sandbox: policy(table) for sandbox, table in sandboxes.items()},
    )


def toml_key(name: str) -> str:
    """A sandbox id as a TOML key: quoted unless bare (ids like /sandtrace/ci need quotes)."""
    if name and all(c.isalnum() or c in "-_" for c in name) and name.isascii():
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def read_policy_file(path: Path) -> EgressPolicies:
    """The policies in the TOML file at path. PolicyFileError lists every problem (one
    when the file cannot be read or is not TOML)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyFileError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyFileError([f"{path}: not valid TOML: {exc}"]) from None
    return parse_policy(data, str(path))
