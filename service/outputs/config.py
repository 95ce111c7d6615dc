"""The [[output]] tables of the service's configuration: checked whole, then made into outputs.

    outputs = outputs_from_config(config["output"])  # the [[output]] tables, as dicts
    for o in outputs: await o.start()
    ...
    for o in outputs: o.submit(item)   # every event and alert; each output picks its own
    ...
    for o in outputs: await o.aclose(deadline=5.0)

Every key is checked before any output is made: an unknown key, a wrong type, a missing
required key, a value out of range, a file that cannot be read (a ca_file that holds no
certificate) and two outputs writing one file raise OutputConfigError listing every problem,
each naming the output (`[[output]] #N`, counted from 1, and its name if it has one), the key
and what is expected.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from service.outputs.base import WHAT, Output, OutputConfigError, OutputSection
from service.outputs.http import ElasticsearchOutput, SplunkHecOutput
from service.outputs.jsonl import JsonlOutput
from service.outputs.syslog import SYSLOG_FACILITIES, SyslogOutput
from service.schemas import SCHEMAS

__all__ = ["OUTPUT_TYPES", "OutputConfigError", "outputs_from_config"]

OUTPUT_TYPES: dict[str, type[Output]] = {
    t.output_type: t for t in (JsonlOutput, SyslogOutput, SplunkHecOutput, ElasticsearchOutput)
}

_KeyType = type | tuple[type, ...]
_NUMBER = (int, float)
_EXPECTED: dict[_KeyType, str] = {
    str: "a string",
    int: "an integer",
    bool: "true or false",
    _NUMBER: "a number",
    (str, int): "a name or a number",
}
# The keys every output takes, then those of each type (see OutputSection for what they are)
_COMMON_KEYS: dict[str, _KeyType] = {
    "type": str,
    "name": str,
    "what": str,
    "schema": str,
    "queue": int,
    "batch": int,
    "backoff": _NUMBER,
    "backoff_max": _NUMBER,
}
_KEYS: dict[str, dict[str, _KeyType]] = {
    "jsonl": {"path": str, "max_bytes": int, "backups": int},
    "syslog": {
        "address": str,
        "tls": bool,
        "ca_file": str,
        "app_name": str,
        "facility": (str, int),
        "connect_timeout": _NUMBER,
    },
    "splunk_hec": {
        "url": str,
        "token_file": str,
        "index": str,
        "sourcetype": str,
        "ca_file": str,
        "insecure": bool,
        "timeout": _NUMBER,
    },
    "elasticsearch": {
        "url": str,
        "index": str,
        "token_file": str,
        "api_key_file": str,
        "ca_file": str,
        "insecure": bool,
        "timeout": _NUMBER,
    },
}
_REQUIRED = {
    "jsonl": ("path",),
    "syslog": ("address",),
    "splunk_hec": ("url", "token_file"),
    "elasticsearch": ("url", "index"),
}


def _toml_type(value: object) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a float"}
    names |= {list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _has_type(value: object, want: _KeyType) -> bool:
    """isinstance, except that true and false are not numbers."""
    if isinstance(value, bool):
        return want is bool
    return isinstance(value, want)


def _readable(path: str) -> str | None:
    """Why a file cannot be read, or None."""
    try:
        with Path(path).open("rb"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None if Path(path).is_file() else "not a regular file"


def _check_section(section: dict[str, Any], label: str) -> list[str]:
    """Every problem with one [[output]] table, each starting with label and the key."""
    kind = section.get("type")
    if kind not in OUTPUT_TYPES:
        got = f"{kind!r}" if "type" in section else "missing"
        return [
            f"{label} type: {got} is not an output type; expected one of "
            f"{', '.join(sorted(OUTPUT_TYPES))}"
        ]
    problems: list[str] = []
    allowed = _COMMON_KEYS | _KEYS[kind]
    good: dict[str, Any] = {}  # the keys known and of their type
    for key, value in section.items():
        if key not in allowed:
            problems.append(
                f"{label} {key}: unknown key for a {kind} output (expected one of "
                f"{', '.join(allowed)})"
            )
        elif not _has_type(value, allowed[key]):
            problems.append(
                f"{label} {key}: {value!r} is {_toml_type(value)}; expected "
                f"{_EXPECTED[allowed[key]]}"
            )
        else:
            good[key] = value
    problems += [
        f"{label} {key}: missing; expected it (type {kind} requires it)"
        for key in _REQUIRED[kind]
        if key not in section
    ]
    checks: list[tuple[str, bool, str]] = []

    def want(key: str, test: Callable[[Any], bool], expected: str) -> None:
        if key in good:
            checks.append((key, test(good[key]), expected))

    want("what", lambda v: v in WHAT, f"one of {', '.join(WHAT)}")
    want("schema", lambda v: v in SCHEMAS, f"one of {', '.join(SCHEMAS)}")
    for key in ("queue", "batch"):
        want(key, lambda v: v >= 1, "at least 1")
    for key in ("backoff", "backoff_max", "connect_timeout", "timeout"):
        want(key, lambda v: v > 0, "a positive number of seconds")
    for key in ("max_bytes", "backups"):
        want(key, lambda v: v >= 0, "0 or more")
    if kind == "syslog":
        want("address", _host_port, "HOST:PORT with a port 1-65535")
        want(
            "facility",
            lambda v: v in SYSLOG_FACILITIES if isinstance(v, str) else 0 <= v < 24,
            "a facility name (e.g. local0) or 0-23",
        )
        if "ca_file" in good and not good.get("tls", False):
            checks.append(("ca_file", False, "tls = true with it (or no ca_file)"))
    if kind in ("splunk_hec", "elasticsearch"):
        want("url", lambda v: v.startswith(("http://", "https://")), "http(s)://...")
        if good.get("insecure") and "ca_file" in good:
            checks.append(("insecure", False, "no ca_file with insecure = true"))
    problems += [
        f"{label} {key}: {section.get(key)!r}: expected {expected}"
        for key, ok, expected in checks
        if not ok
    ]
    for key in ("ca_file", "token_file", "api_key_file"):
        if key in good and not any(p.startswith(f"{label} {key}:") for p in problems):
            why = _readable(good[key])
            if why is not None:
                problems.append(
                    f"{label} {key}: cannot read {good[key]}: {why}; expected a readable file"
                )
            elif key == "ca_file":
                try:
                    ssl.create_default_context(cafile=good[key])
                except (ssl.SSLError, ValueError) as exc:
                    problems.append(
                        f"{label} ca_file: {good[key]} holds no usable certificate ({exc}); "
                        "expected PEM CA certificates"
                    )
    if kind == "jsonl" and isinstance(good.get("path"), str) and good["path"] != "-":
        parent = Path(good["path"]).parent
        if not parent.is_dir():
            problems.append(
                f"{label} path: directory {parent} does not exist; expected the path of a "
                "file in an existing directory"
            )
    return problems


def _host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def outputs_from_config(
    sections: list[dict[str, Any]], where: list[str] | None = None
) -> list[Output]:
    """The outputs the [[output]] tables describe, checked whole before any is made (no
    sender starts before start()). `where` says where each table was given (default
    `[[output]] #N`, counted from 1). Raises OutputConfigError listing every problem."""
    labels = where if where is not None else []
    labels += [f"[[output]] #{i}" for i in range(len(labels) + 1, len(sections) + 1)]
    problems: list[str] = []
    names: dict[str, str] = {}
    paths: dict[Path, str] = {}
    for index, section in enumerate(sections):
        label = labels[index]
        if not isinstance(section, dict):
            problems.append(f"{label}: is {_toml_type(section)}; expected a table")
            continue
        name = section.get("name")
        if isinstance(name, str) and name != label:
            label += f" ({name})"
        found = _check_section(section, label)
        problems += found
        if isinstance(name, str):
            if name in names:
                problems.append(
                    f"{label} name: {name!r} is also the name of {names[name]}; expected a "
                    "name of its own"
                )
            names.setdefault(name, label)
        path = section.get("path")
        if section.get("type") == "jsonl" and isinstance(path, str) and path != "-":
            real = Path(path).resolve()
            if real in paths:
                problems.append(
                    f"{label} path: {path} is also written by {paths[real]}; expected a file "
                    "of its own for each output"
                )
            paths.setdefault(real, label)
    if problems:
        raise OutputConfigError(problems)
    made: list[tuple[str, Output]] = []
    for label, section in zip(labels, sections, strict=False):
        try:
            made.append(
                (label, OUTPUT_TYPES[section["type"]](cast(OutputSection, section), len(made)))
            )
        except (OutputConfigError, OSError, ssl.SSLError, ValueError) as exc:
            problems.append(f"{label}: {exc}")
    seen: set[str] = set()
    for label, o in made:
        if o.name in seen:  # a default name (type and index) taken by a named output
            problems.append(
                f"{label} name: {o.name!r} is also the name of another output; expected a "
                "name of its own"
            )
        seen.add(o.name)
    if problems:
        raise OutputConfigError(problems)
    return [o for _label, o in made]
