"""The fleet's names and settings, without a server: host tokens, message ids, addresses,
credentials and the [fleet] table checked with errors that name what is wrong."""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet import names
from fleet.connect import NatsConfigError, is_nats_url, parse_servers, target
from sandtrace.cli import build_parser
from service.config import ConfigError, ServiceConfig, load
from service.fleetconfig import fleet_options


@given(st.text())
def test_a_host_is_one_subject_token_and_comes_back(host: str) -> None:
    token = names.host_token(host)
    assert token and all(c.isalnum() or c in "-_" for c in token) and token.isascii()
    assert names.host_of_token(token) == host


def test_host_tokens_keep_dots_and_wildcards_out_of_subjects() -> None:
    assert names.events_subject("gpu-1.example.com") == "sandtrace.events.gpu-1_2eexample_2ecom"
    assert names.host_token("a*>") == "a_2a_3e"
    assert names.host_token("a_2e") != names.host_token("a.")


def test_the_partition_is_fnv1a_of_the_token() -> None:
    # nats-server's partition(): 32-bit FNV-1a of the token, modulo the count (values as
    # the server stored them in tests/e2e/test_fleet.py's clusters)
    assert names.fnv1a_partition("node-1", 4) == 3
    assert names.fnv1a_partition("a.b.c", 4) == 3
    assert names.fnv1a_partition("x y", 4) == 1
    source, dest = names.partition_transform(16)
    assert (source, dest) == (
        "sandtrace.events.*",
        "sandtrace.part.{{partition(16,1)}}.{{wildcard(1)}}",
    )


def test_output_ids_derive_from_the_batch() -> None:
    assert names.batch_msg_id("h/ab12", 7) == "h/ab12:7"
    assert names.alert_msg_id("h/ab12", 7, 0) != names.alert_msg_id("h/ab12", 7, 1)
    assert names.siem_msg_id("h/ab12", 7, "ecs") == "h/ab12:7:ecs"


def test_alert_ids_derive_from_their_message_ids() -> None:
    """The same input, the same UUIDv7 (its event's millisecond first); another, another."""
    first = names.alert_uuid("h/ab12:7:a0", 1_700_000_000_123_456_789)
    assert first == names.alert_uuid("h/ab12:7:a0", 1_700_000_000_123_456_789)
    assert first != names.alert_uuid("h/ab12:7:a1", 1_700_000_000_123_456_789)
    parsed = uuid.UUID(first)
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert parsed.int >> 80 == 1_700_000_000_123
    assert names.summary_msg_id(first) == f"{first}:s"


def test_addresses() -> None:
    assert parse_servers("nats://127.0.0.1:4222,127.0.0.1:4223") == [
        "nats://127.0.0.1:4222",
        "nats://127.0.0.1:4223",
    ]
    assert is_nats_url("tls://a:1,b:2") and not is_nats_url("https://a:1")
    for bad in ("nats://a", "nats://u:p@a:1", "http://a:1", "nats://a:1,b"):
        with pytest.raises(NatsConfigError):
            parse_servers(bad)


def test_credentials_and_clear_text_are_checked(tmp_path: Path) -> None:
    with pytest.raises(NatsConfigError, match=r"refusing clear text to 10\.0\.0\.1"):
        target("nats://10.0.0.1:4222")
    assert target("nats://10.0.0.1:4222", insecure=True).tls is None
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    options = target("nats://127.0.0.1:4222", token_file=str(token)).options()
    assert options["token"] == "s3cret"  # noqa: S105 (the test's own token)
    creds = tmp_path / "w.creds"
    creds.write_text("not a creds file")
    with pytest.raises(NatsConfigError, match="is not a NATS credentials file"):
        target("nats://127.0.0.1:4222", creds_file=str(creds))
    with pytest.raises(NatsConfigError, match="give one of token, nkey and credentials"):
        target("nats://127.0.0.1:4222", token_file=str(token), creds_file=str(creds))
    with pytest.raises(NatsConfigError, match="cannot read nkey seed file"):
        target("nats://127.0.0.1:4222", nkey_file=str(tmp_path / "missing"))


def _serve(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_the_fleet_table_and_the_command_line(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text(
        '[fleet]\nurl = "nats://127.0.0.1:4222"\npartitions = 4\nsiem_events = ["ecs"]\n'
    )
    cfg = load(config)
    where, settings = fleet_options(_serve("--partitions", "8"), cfg)
    assert where.servers == ["nats://127.0.0.1:4222"]
    assert (settings.partitions, settings.siem_events) == (8, ("ecs",))
    for table, error in (
        ("partitions = 0", "fleet.partitions must be 1 to 1024"),
        ("replicas = 2", "fleet.replicas must be 1, 3 or 5"),
        ("lease_seconds = 20", "fleet.ack_wait must be at least twice"),
        ('siem_events = ["splunk"]', "fleet.siem_events is a list of native, ecs, ocsf"),
        ("leases = 3", "unknown key fleet.leases"),
        ('partitions = "8"', "fleet.partitions must be a number"),
    ):
        config.write_text(f'[fleet]\nurl = "nats://127.0.0.1:4222"\n{table}\n')
        with pytest.raises(ConfigError, match=error):
            fleet_options(_serve(), load(config))
    with pytest.raises(ConfigError, match="no NATS cluster: give --nats"):
        fleet_options(_serve(), ServiceConfig())
