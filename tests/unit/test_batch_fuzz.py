"""The service's batch decoder against 100,000 mutated and random inputs per format (msgpack
and JSON): it returns a batch or raises BadBatch, and nothing else (no crash, no other
exception); and the JSON format's own checks."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import msgspec
import pytest

from api.events import ConnectEvent, ExecEvent, Process, to_dict, to_row
from api.wire import CONTENT_TYPE, JSON_CONTENT_TYPE, BadBatch, decode_batch, encode_batch
from detect.testing import event_from_fields

ROUNDS = 100_000


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.4 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op < 0.6 and b:
            del b[rng.randrange(len(b)) :]
        elif op < 0.8:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        else:
            b += rng.randbytes(rng.randint(1, 16))
    return bytes(b)


def seeds(fmt: str) -> list[bytes]:
    exec_map = to_dict(event_from_fields("process_creation", {"CommandLine": "a b"}))
    version_1 = msgpack.packb(
        {"v": 1, "collector": "c", "seq": 4, "events": [exec_map]}, use_bin_type=True
    )
    connect = event_from_fields("network_connection", {"DestinationPort": 22})
    version_2 = msgpack.packb(
        {"v": 2, "collector": "c", "seq": 5, "events": [to_row(connect)]}, use_bin_type=True
    )
    shared = [connect, event_from_fields("process_creation", {"CommandLine": "c"}), connect]
    older = [version_1, version_2, encode_batch("c", 6, shared)]
    return (older if fmt == "msgpack" else []) + [
        encode_batch("c", 1, [event_from_fields("process_creation", {"CommandLine": "a b"})], fmt),
        encode_batch(
            "c", 2, [event_from_fields("network_connection", {"DestinationPort": 22})], fmt
        ),
        encode_batch("c", 3, [], fmt),
    ]


@pytest.mark.parametrize("content_type", [CONTENT_TYPE, JSON_CONTENT_TYPE])
def test_decoder_survives_mutations_and_noise(content_type: str) -> None:
    rng = random.Random(20261127)
    inputs = seeds("json" if content_type == JSON_CONTENT_TYPE else "msgpack")
    decoded = rejected = 0
    for i in range(ROUNDS):
        data = rng.randbytes(rng.randint(0, 64)) if i % 10 == 0 else mutate(rng, rng.choice(inputs))
        try:
            decode_batch(data, content_type)
            decoded += 1
        except BadBatch as exc:
            assert exc.status in (400, 409, 413), exc
            rejected += 1
    assert decoded + rejected == ROUNDS
    assert rejected > ROUNDS // 2  # the mutations really broke most inputs


def test_json_batches_mean_what_msgpack_batches_do() -> None:
    """Same events both ways, including bytes that are not UTF-8 (argv, paths)."""
    exe = event_from_fields("process_creation", {"Image": "/tmp/x", "CommandLine": "a b"})
    assert isinstance(exe, ExecEvent)
    exe.argv = [b"a\xff\x00b", b"\xe2\x82"]
    exe.process.exe = b"/tmp/\xfe\xed"
    events = [exe, event_from_fields("network_connection", {"DestinationPort": 22})]
    via_json = decode_batch(encode_batch("c", 5, events, "json"), JSON_CONTENT_TYPE)
    via_msgpack = decode_batch(encode_batch("c", 5, events), CONTENT_TYPE)
    assert via_json == via_msgpack == ("c", 5, events)


def test_a_batch_carries_each_process_once_and_gives_back_the_events_it_took() -> None:
    """encode_batch sends a table of distinct processes, events referring to it by index;
    the events it was given keep their processes; decode_batch gives each event its own
    back, one object per distinct process."""
    a = event_from_fields("network_connection", {"DestinationPort": 22, "ProcessId": 5})
    b = event_from_fields("network_connection", {"DestinationPort": 23, "ProcessId": 5})
    c = event_from_fields("process_creation", {"CommandLine": "x", "ProcessId": 6})
    assert isinstance(a, ConnectEvent) and isinstance(b, ConnectEvent)
    assert isinstance(c, ExecEvent)
    assert a.process == b.process and a.process is not b.process  # equal, not the same object
    events: list[Any] = [a, b, c, a]
    before = [e.process for e in events]
    body = encode_batch("c", 9, events)
    assert [e.process for e in events] == before
    assert all(isinstance(e.process, Process) for e in events)
    raw = msgpack.unpackb(body, raw=False)
    assert list(raw) == ["v", "collector", "seq", "processes", "events"]
    assert len(raw["processes"]) == 2
    assert [row[8] for row in raw["events"]] == [0, 0, 1, 0]
    collector, seq, decoded = decode_batch(body)
    back: list[Any] = decoded
    assert (collector, seq, back) == ("c", 9, events)
    assert back[0].process is back[1].process is back[3].process
    assert back[2].process is not back[0].process


def test_a_version_4_batch_is_still_read_its_new_fields_empty() -> None:
    """A collector from before the process identity fields and the connect's `denied`
    (wire version 4) sends shorter rows: the service reads them, those fields empty."""
    made = event_from_fields("network_connection", {"DestinationPort": 22, "ProcessId": 5})
    assert isinstance(made, ConnectEvent)
    process = msgspec.structs.replace(made.process, sha256="ab" * 32, cwd=b"/w")
    connect = msgspec.structs.replace(made, denied=True, process=process)
    raw = msgpack.unpackb(encode_batch("c", 3, [connect]), raw=False)
    assert raw["v"] == 5
    new_process = ("sha256", "original_exe", "go_module", "cwd", "filename")
    assert Process.__struct_fields__[-5:] == new_process
    assert ConnectEvent.__struct_fields__[-1] == "denied"
    old = {
        **raw,
        "v": 4,
        "processes": [row[:-5] for row in raw["processes"]],
        "events": [row[:-1] for row in raw["events"]],
    }
    _, _, [back] = decode_batch(msgpack.packb(old))
    assert isinstance(back, ConnectEvent)
    assert (back.dport, back.process.pid, back.denied) == (22, 5, False)
    assert not any(getattr(back.process, f) for f in new_process)


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b'{"v": 2, "collector": "c", "seq": 1, "events": []}', 409, "version 2"),
        (b'{"v": 1, "collector": "c", "seq": 1, "events": [{"kind": "nope"}]}', 400, "nope"),
        (b'{"v": 1, "collector": "c", "seq": -1, "events": []}', 400, "sequence"),
        (b"[" * 100_000, 400, "not JSON"),
        (
            b'{"v": 1, "collector": "c", "seq": 1, "events": [{"kind": "exec", "argv": 7}]}',
            400,
            "not text",
        ),
        (
            b'{"v": 1, "collector": "c", "seq": 1, "events": [{"kind": "exec", "cwd": "\\ud800"}]}',
            400,
            "not text",
        ),
    ],
)
def test_bad_json_batches(body: bytes, status: int, says: str) -> None:
    with pytest.raises(BadBatch) as caught:
        decode_batch(body, JSON_CONTENT_TYPE)
    assert caught.value.status == status
    assert says in str(caught.value)


def test_too_many_events_and_unknown_type() -> None:
    many = b'{"v": 1, "collector": "c", "seq": 1, "events": [' + b",".join([b"{}"] * 50_001)
    with pytest.raises(BadBatch) as caught:
        decode_batch(many + b"]}", JSON_CONTENT_TYPE)
    assert caught.value.status == 413
    with pytest.raises(BadBatch) as caught:
        decode_batch(b"{}", "text/plain")
    assert caught.value.status == 415
    with pytest.raises(ValueError, match="msgpack or json"):
        encode_batch("c", 1, [], "xml")


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_the_service_bench_sends_what_encode_batch_would(fmt: str) -> None:
    """bench/service.py splices a header before events encoded once; the bytes must decode
    as the batch encode_batch makes."""
    from bench.service import batch_body, encoded_events, mix  # noqa: PLC0415

    events = mix(0, 30)
    body = batch_body("bench-collector-0", 7, encoded_events(events, fmt), fmt)
    content_type = JSON_CONTENT_TYPE if fmt == "json" else CONTENT_TYPE
    assert decode_batch(body, content_type) == decode_batch(
        encode_batch("bench-collector-0", 7, events, fmt), content_type
    )
    assert decode_batch(body, content_type) == ("bench-collector-0", 7, events)
