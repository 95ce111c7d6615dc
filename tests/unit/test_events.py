"""The versioned msgpack encoding of events: exact round trips, clear errors, no crash."""

from __future__ import annotations

import contextlib
import re
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.events import (
    WIRE_VERSION,
    Alert,
    AncestorRef,
    AnyEvent,
    ConnectEvent,
    EventFormatError,
    ExecEvent,
    ExitEvent,
    LostEvent,
    Process,
    WireVersionError,
    decode,
    encode,
    from_dict,
    from_row,
    to_dict,
    to_row,
)


def process() -> Process:
    return Process(
        pid=42,
        tid=43,
        ns_pid=1,
        ppid=41,
        uid=1000,
        gid=100,
        comm=b"x\x1bmine",
        start_ns=7,
        key="42@7",
        exe=b"/tmp/\xff\xfeminer",
        user="agent",
        group="users",
        ancestry=[AncestorRef(pid=41, key="41@3", exe=b"/bin/sh", argv=[b"sh", b"", b"-c"])],
    )


COMMON: dict[str, Any] = {
    "time_ns": 1,
    "mono_ns": 2,
    "host": "h",
    "sandbox": "st-1",
    "cgroup_id": 9,
    "cgroup_path": "/sandtrace/st-1",
    "container_id": "",
}

EVENTS: list[AnyEvent] = [
    ExecEvent(
        **COMMON,
        process=process(),
        argv=[b"xmrig", b"", b"\xff", b"-o stratum"],
        argv_truncated=True,
        argv_size=99999,
        cwd=b"/tmp",
        fileless=True,
    ),
    ConnectEvent(
        **COMMON,
        process=process(),
        protocol="tcp",
        family="ipv6",
        daddr="2001:db8::1",
        dport=3333,
        outcome="error",
        errno=111,
        errno_name="ECONNREFUSED",
    ),
    ExitEvent(**COMMON, process=process(), exit_code=0, signal=9, core_dumped=True),
    LostEvent(time_ns=5, host="h", kernel={"exec": 3}, user=2, errors={"stash_map_full": 1}),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.kind)
def test_round_trip_is_exact(event: AnyEvent) -> None:
    assert decode(encode(event)) == event


def test_wrong_version_names_both_versions() -> None:
    data = msgpack.packb({"v": WIRE_VERSION + 1, "kind": "exit"})
    with pytest.raises(
        WireVersionError, match=rf"version {WIRE_VERSION + 1}.*reads {WIRE_VERSION}"
    ):
        decode(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (msgpack.packb([1, 2]), "not a map"),
        (msgpack.packb({"v": WIRE_VERSION, "kind": "bogus"}), "unknown event kind"),
        (
            msgpack.packb({"v": WIRE_VERSION, "kind": "lost", "host": "h"}),
            "lost event has no time_ns",
        ),
        (
            msgpack.packb({"v": WIRE_VERSION, "kind": "exit", **COMMON, "process": 3}),
            "exit event: process: Expected `array`, got `int`",
        ),
        (b"\xc1", "not a msgpack event"),
        (encode(EVENTS[0])[:-3], "not a msgpack event"),
    ],
)
def test_bad_input_gets_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(EventFormatError, match=message):
        decode(data)


@settings(max_examples=3000, database=None, deadline=None)
@given(st.binary(max_size=512))
def test_decoder_never_crashes(data: bytes) -> None:
    # Anything but ValueError (WireVersionError, EventFormatError) fails the test.
    with contextlib.suppress(ValueError):
        decode(data)


@settings(max_examples=300, database=None, deadline=None)
@given(st.integers(0, len(encode(EVENTS[1])) - 1), st.integers(0, 255))
def test_decoder_never_crashes_on_corrupted_events(pos: int, byte: int) -> None:
    data = bytearray(encode(EVENTS[1]))
    data[pos] = byte
    with contextlib.suppress(ValueError):
        decode(bytes(data))


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.kind)
def test_row_round_trip_is_exact(event: AnyEvent) -> None:
    row = to_row(event)
    assert row[0] == event.kind
    assert from_row(msgpack.unpackb(msgpack.packb(row, use_bin_type=True), raw=False)) == event


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda r: [*r, 1], "exec event row: Expected `array` of at most length"),
        (lambda r: r[:5], "exec event row: Expected `array` of at least length"),
        (lambda r: [7, *r[1:]], "event row: Expected `str`, got `int`"),
        (lambda r: ["exce", *r[1:]], "unknown event kind 'exce' in a row"),
        (lambda r: ["alert"], "unknown event kind 'alert' in a row"),
        (lambda r: [*r[:1], "now", *r[2:]], "exec event: time_ns: Expected `int`, got `str`"),
        (lambda r: [*r[:1], True, *r[2:]], "exec event: time_ns: Expected `int`, got `bool`"),
        (
            lambda r: [*r[:8], [*r[8][:6], "comm", *r[8][7:]], *r[9:]],
            "exec event: process.comm: Expected `bytes`, got `str`",
        ),
        (
            lambda r: [*r[:8], [*r[8][:13], [[1, "k", b"", [b"a", None]]]], *r[9:]],
            "exec event: process.ancestry[0].argv[1]: Expected `bytes`, got `None`",
        ),
    ],
)
def test_rows_with_wrong_shapes_or_types_are_refused(mangle: Any, message: str) -> None:
    exec_event = next(e for e in EVENTS if isinstance(e, ExecEvent))
    with pytest.raises(EventFormatError, match=re.escape(message)):
        from_row(mangle(to_row(exec_event)))


def test_maps_with_wrong_types_are_refused() -> None:
    exec_event = next(e for e in EVENTS if isinstance(e, ExecEvent))
    d = to_dict(exec_event)
    d["argv"] = [b"ok", 5]
    with pytest.raises(EventFormatError, match=re.escape("Expected `bytes`, got `int`")):
        from_dict(d)
    d = to_dict(exec_event)
    d["process"]["comm"] = "text"  # text where bytes belong: refused, not base64-decoded
    with pytest.raises(EventFormatError, match=re.escape("Expected `bytes`, got `str`")):
        from_dict(d)
    d = to_dict(exec_event)
    d["surplus"] = 1
    with pytest.raises(EventFormatError, match="unknown fields: surplus"):
        from_dict(d)


def _asdict(event: Any) -> dict[str, Any]:
    """The reference, field by field through msgspec's own view of the record: nested
    records as maps, lists copied, with the kinds of events."""

    def plain(value: Any) -> Any:
        if isinstance(value, msgspec.Struct):
            d = {f: plain(getattr(value, f)) for f in value.__struct_fields__}
            if value.__struct_config__.tag is not None:
                d["kind"] = value.__struct_config__.tag
            return d
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    d: dict[str, Any] = plain(event)
    return d


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.kind)
def test_to_dict_is_asdict_with_the_kind(event: AnyEvent) -> None:
    d = to_dict(event)
    assert d == _asdict(event)
    assert list(d) == list(_asdict(event))  # same key order: JSON lines look the same
    if "process" in d:  # copies, not the event's own lists
        d["process"]["argv"].append(b"x")
        assert to_dict(event) == _asdict(event)


def test_alert_to_dict_nests_its_events_with_their_kinds() -> None:
    exec_event = next(e for e in EVENTS if isinstance(e, ExecEvent))
    alert = Alert(
        alert_id="h-1",
        rule_id="r",
        title="t",
        level="high",
        tags=["a"],
        description="d",
        time_ns=1,
        host="h",
        sandbox="s",
        process=exec_event.process,
        events=[exec_event],
    )
    d = to_dict(alert)
    assert d == _asdict(alert) and d["events"][0]["kind"] == "exec" and d["kind"] == "alert"
