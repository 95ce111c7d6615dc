"""The [[output]] tables of the service's configuration: checked whole, then made into outputs.

    outputs = outputs_from_config(config["output"])  # the [[output]] tables, as dicts
    for o in outputs: await o.start()
    ...
    for o in outputs: o.submit(item)   # every event and alert; each output picks its own
    ...
    for o in outputs: await o.aclose(deadline=5.0)

Every key is checked before any output is made: an unknown key, a wrong type, a missing
required key, a value out of range or a file that cannot be read raises OutputConfigError
naming the output (its index, and its name if it has one) and the key.
"""

from __future__ import annotations

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


def _check_section(section: dict[str, Any], index: int) -> OutputSection:
    """section, checked: the OutputSection it is. Raises OutputConfigError."""
    label = f"output {index}"
    if "name" in section and isinstance(section["name"], str):
        label += f" ({section['name']})"
    kind = section.get("type")
    if kind not in OUTPUT_TYPES:
        raise OutputConfigError(
            f"{label}: type: {kind!r} is not one of {', '.join(sorted(OUTPUT_TYPES))}"
        )
    allowed = _COMMON_KEYS | _KEYS[kind]
    for key, value in section.items():
        if key not in allowed:
            raise OutputConfigError(f"{label}: {key}: unknown key for a {kind} output")
        want = allowed[key]
        if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
            raise OutputConfigError(f"{label}: {key}: {value!r} has the wrong type")
    for key in _REQUIRED[kind]:
        if key not in section:
            raise OutputConfigError(f"{label}: {key}: missing (required for a {kind} output)")
    checks: list[tuple[str, bool, str]] = [
        ("what", section.get("what", "both") in WHAT, f"must be one of {', '.join(WHAT)}"),
        (
            "schema",
            section.get("schema", "native") in SCHEMAS,
            f"must be one of {', '.join(SCHEMAS)}",
        ),
        ("queue", section.get("queue", 1) >= 1, "must be at least 1"),
        ("batch", section.get("batch", 1) >= 1, "must be at least 1"),
        ("backoff", section.get("backoff", 1) > 0, "must be positive"),
        ("backoff_max", section.get("backoff_max", 1) > 0, "must be positive"),
        ("max_bytes", section.get("max_bytes", 0) >= 0, "must not be negative"),
        ("backups", section.get("backups", 0) >= 0, "must not be negative"),
    ]
    if kind == "syslog":
        host, sep, port = section["address"].rpartition(":")
        good = bool(sep and host and port.isdigit() and 0 < int(port) < 65536)
        checks.append(("address", good, "must be HOST:PORT"))
        facility = section.get("facility", "user")
        good = facility in SYSLOG_FACILITIES if isinstance(facility, str) else 0 <= facility < 24
        checks.append(("facility", good, "must be a facility name (e.g. local0) or 0-23"))
        if "ca_file" in section and not section.get("tls", False):
            checks.append(("ca_file", False, "needs tls = true"))
    if kind in ("splunk_hec", "elasticsearch"):
        url = section["url"]
        checks.append(("url", url.startswith(("http://", "https://")), "must be http(s)://..."))
        if section.get("insecure") and "ca_file" in section:
            checks.append(("insecure", False, "contradicts ca_file"))
    for key, ok, why in checks:
        if not ok:
            raise OutputConfigError(f"{label}: {key}: {section.get(key)!r} {why}")
    for key in ("ca_file", "token_file", "api_key_file"):
        if key in section and not Path(section[key]).is_file():
            raise OutputConfigError(f"{label}: {key}: {section[key]} is not a readable file")
    if kind == "jsonl" and section["path"] != "-":
        parent = Path(section["path"]).parent
        if not parent.is_dir():
            raise OutputConfigError(f"{label}: path: directory {parent} does not exist")
    # every key is known and of its type now: the table is what OutputSection says
    return cast(OutputSection, section)


def outputs_from_config(sections: list[dict[str, Any]]) -> list[Output]:
    """The outputs the [[output]] tables describe, checked whole before any is made (no
    sender starts before start()). Raises OutputConfigError naming the output and key."""
    checked: list[OutputSection] = []
    for index, section in enumerate(sections):
        if not isinstance(section, dict):
            raise OutputConfigError(f"output {index}: is not a table")
        checked.append(_check_section(section, index))
    outputs = [OUTPUT_TYPES[s["type"]](s, i) for i, s in enumerate(checked)]
    seen: set[str] = set()
    for index, o in enumerate(outputs):
        if o.name in seen:
            raise OutputConfigError(f"output {index} ({o.name}): name: used by another output")
        seen.add(o.name)
    return outputs
