"""The fleet settings of `sandtrace serve --nats`: the [fleet] table of the configuration
file, overridden by the command line, checked.

    [fleet]
    url = "nats://10.0.0.1:4222,10.0.0.2:4222,10.0.0.3:4222"   # or --nats
    ca_file = "/etc/sandtrace/nats-ca.pem"   # TLS: verify the servers against this CA
    creds_file = "/etc/sandtrace/worker.creds"  # or token_file, or nkey_file (one of them)
    partitions = 16              # fixed when the events stream is made
    replicas = 3                 # of every stream and of the lease bucket
    events_max_age = 86400       # seconds a batch is kept (and replayable)
    events_max_bytes = -1        # bytes of batches kept (-1: bounded by age only)
    alerts_max_age = 2592000
    alerts_max_bytes = -1
    duplicate_window = 600       # seconds within which a batch or output id is stored once
    lease_seconds = 10           # a dead worker's partitions move after this
    ack_wait = 30                # seconds before JetStream redelivers an unacknowledged batch
    rebuild_seconds = -1         # state rebuilt on takeover; -1: the rules' longest window
    siem_events = ["ecs"]        # also publish each batch's events in these schemas
"""

from __future__ import annotations

import argparse
from typing import Any

from fleet.connect import NatsTarget, target
from fleet.streams import FleetSettings
from service.config import ConfigError, ServiceConfig

_NUMBERS = {
    "partitions": int,
    "replicas": int,
    "events_max_bytes": int,
    "alerts_max_bytes": int,
    "events_max_age": float,
    "alerts_max_age": float,
    "duplicate_window": float,
    "lease_seconds": float,
    "ack_wait": float,
    "rebuild_seconds": float,
}
_FILES = ("url", "token_file", "nkey_file", "creds_file", "ca_file")
KEYS = (*_FILES, *_NUMBERS, "siem_events")


def fleet_options(args: argparse.Namespace, cfg: ServiceConfig) -> tuple[NatsTarget, FleetSettings]:
    """Where the cluster is and how the fleet is laid out; ConfigError or NatsConfigError
    (both ValueErrors) naming the setting that is wrong."""
    table: dict[str, Any] = dict(getattr(cfg, "fleet", {}) or {})
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise ConfigError(f"unknown key fleet.{unknown[0]} (known: {', '.join(KEYS)})")
    for key, flag in (
        ("url", "nats"),
        ("token_file", "nats_token_file"),
        ("nkey_file", "nats_nkey_file"),
        ("creds_file", "nats_creds_file"),
        ("ca_file", "nats_ca_file"),
        ("partitions", "partitions"),
        ("replicas", "replicas"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            table[key] = value
    settings = FleetSettings()
    for key, kind in _NUMBERS.items():
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"fleet.{key} must be a number, not {value!r}")
            if kind is int and not isinstance(value, int):
                raise ConfigError(f"fleet.{key} must be a whole number, not {value!r}")
            setattr(settings, key, kind(value))
    if "siem_events" in table:
        from service.schemas import SCHEMAS  # noqa: PLC0415

        schemas = table["siem_events"]
        if not isinstance(schemas, list) or not all(s in SCHEMAS for s in schemas):
            raise ConfigError(f"fleet.siem_events is a list of {', '.join(SCHEMAS)}")
        settings.siem_events = tuple(schemas)
    for key in _FILES:
        if key in table and not isinstance(table[key], str):
            raise ConfigError(f"fleet.{key} must be a string")
    try:
        settings.check()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    url = table.get("url")
    if not url:
        raise ConfigError("no NATS cluster: give --nats nats://HOST:PORT[,HOST:PORT...]")
    where = target(
        url,
        token_file=table.get("token_file"),
        nkey_file=table.get("nkey_file"),
        creds_file=table.get("creds_file"),
        ca_file=table.get("ca_file"),
        insecure=cfg.insecure,
    )
    return where, settings
