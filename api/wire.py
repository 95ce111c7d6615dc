"""The batch wire format between collectors and the detection service.

A batch is a map:
    {"v": <batch version>, "collector": "<id>", "seq": <int>, "processes": [...],
     "events": [...]}
Version 4 (what collectors send, msgpack ``application/msgpack``): each event is a row,
api.events.to_row(): its kind, then its fields in order, bytes as bin; in place of its
process, the index of that process in "processes", the batch's table of distinct processes
(each a Process row). A process does many things in a burst, and its row (argv, ancestry) is
most of an event's: sent once, a batch is smaller, and the service decodes, keeps and frees
each process once. Version 2 is version 3 without the table, every event with its process
inline; version 3 is version 4 without `dns` and `response` events and the names and
protocols of connects (a service that reads 3 at most says so, 409, instead of failing on a
kind it does not know). Version 1: each event is a map, api.events.to_dict(), in msgpack or
in JSON (``application/json``, bytes fields as strings the way api.render.json_line writes
them, read back with bytes_from_json); JSON batches are always version 1, the readable form
for other producers. decode_batch() accepts any bytes and either returns the batch, every
event's field types checked, or raises BadBatch with the HTTP status and a reason,
whichever the format.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
import msgspec

from api.events import (
    EVENT_TYPES,
    Alert,
    AncestorRef,
    AnyEvent,
    EventFormatError,
    LostEvent,
    Process,
    RowEvent,
    explain_row_error,
    fields_of,
    from_dict,
    refuse_process_index,
)
from api.render import bytes_from_json, json_line

BATCH_VERSION = 5  # rows and a process table; versions 1 (maps), 2, 3 and 4 are still read
BATCH_VERSIONS = (1, 2, 3, 4, 5)
MAX_BATCH_BYTES = 8 << 20
MAX_BATCH_EVENTS = 50_000
CONTENT_TYPE = "application/msgpack"
JSON_CONTENT_TYPE = "application/json"
CONTENT_TYPES = (CONTENT_TYPE, JSON_CONTENT_TYPE)


class BadBatch(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class _Head(msgspec.Struct, gc=False):
    """A msgpack batch's map, its events left undecoded until the version is known."""

    v: Any = None
    collector: Any = None
    seq: Any = None
    processes: msgspec.Raw = msgspec.Raw()
    events: msgspec.Raw = msgspec.Raw()


class _Batch(msgspec.Struct, gc=False):
    """A well-formed batch of rows, decoded in one pass (the usual case)."""

    v: int
    collector: str
    seq: int
    events: list[RowEvent]
    processes: list[Process] = []


_HEAD = msgspec.msgpack.Decoder(_Head)
_BATCH = msgspec.msgpack.Decoder(_Batch)
_ROWS = msgspec.msgpack.Decoder(list[RowEvent])
_PROCESSES = msgspec.msgpack.Decoder(list[Process])
_ENCODER = msgspec.msgpack.Encoder()


def encode_batch(collector: str, seq: int, events: list[AnyEvent], fmt: str = "msgpack") -> bytes:
    """A batch as collectors send it (the inverse of decode_batch), as "msgpack" or "json"."""
    if fmt == "json":
        head = json.dumps({"v": 1, "collector": collector, "seq": seq})
        return f'{head[:-1]}, "events": [{",".join(map(json_line, events))}]}}'.encode()
    if fmt != "msgpack":
        raise ValueError(f"batch format {fmt!r}: msgpack or json")
    # Events encode as their rows (api.events: a record's encoding is its row), each
    # process replaced by its index in the table for the time of the encoding: the events
    # are the caller's, and they are as they were when this returns.
    table: dict[bytes, int] = {}  # a process's encoding -> its index
    by_id: dict[int, int] = {}  # id() of a Process -> its index: events share their process
    held: list[tuple[Any, Process]] = []
    try:
        for event in events:
            process = getattr(event, "process", None)
            if process is None or process.__class__ is int:
                continue  # no process (a LostEvent), or an event listed twice and seen
            index = by_id.get(id(process))
            if index is None:
                index = by_id[id(process)] = table.setdefault(_ENCODER.encode(process), len(table))
            held.append((event, process))
            event.process = index  # type: ignore[union-attr]
        body = {
            "v": BATCH_VERSION,
            "collector": collector,
            "seq": seq,
            "processes": list(map(msgspec.Raw, table)),
            "events": events,
        }
        return _ENCODER.encode(body)
    finally:
        for event, process in held:
            event.process = process


def decode_batch(body: bytes, content_type: str = CONTENT_TYPE) -> tuple[str, int, list[AnyEvent]]:
    """A batch's collector id, sequence number and events; BadBatch says what is wrong."""
    from_json = content_type == JSON_CONTENT_TYPE
    if from_json:
        try:
            batch = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise BadBatch(400, "malformed", f"body is not JSON: {exc}") from None
        if not isinstance(batch, dict):
            raise BadBatch(400, "malformed", "batch is not a map")
        version, collector, seq, raw = (
            batch.get("v"),
            batch.get("collector"),
            batch.get("seq"),
            batch.get("events"),
        )
    elif content_type == CONTENT_TYPE:
        try:  # what collectors send decodes in one pass; anything else is looked at closely
            batch = _BATCH.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError):
            batch = None
        if (
            batch is not None
            and batch.v == BATCH_VERSION
            and batch.collector
            and batch.seq >= 0
            and len(batch.events) <= MAX_BATCH_EVENTS
        ):
            _place_processes(batch.events, batch.processes)
            return batch.collector, batch.seq, batch.events
        try:
            head = _HEAD.decode(body)
        except msgspec.ValidationError:
            raise BadBatch(
                400, "malformed", "batch is not a map of v, collector, seq, processes and events"
            ) from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise BadBatch(400, "malformed", f"body is not msgpack: {exc}") from None
        version, collector, seq, raw = head.v, head.collector, head.seq, head.events
    else:
        wanted = " or ".join(CONTENT_TYPES)
        raise BadBatch(415, "content_type", f"send {wanted}, not {content_type}")
    if version not in BATCH_VERSIONS or (from_json and version != 1):
        readable = "version 1" if from_json else "versions 1 to 5"
        raise BadBatch(
            409,
            "version",
            f"batch wire version {version!r} is not supported; this service reads "
            f"{readable}{' of JSON batches' if from_json else ''}",
        )
    if not isinstance(collector, str) or not collector:
        raise BadBatch(400, "malformed", "batch has no collector id")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise BadBatch(400, "malformed", "batch has no sequence number")
    if version in (2, 3, 4, 5):
        if not isinstance(raw, msgspec.Raw) or not raw:
            raise BadBatch(400, "malformed", "batch events is not a list")
        try:
            events: list[AnyEvent] = _ROWS.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise BadBatch(400, "malformed", _row_error(str(exc), raw)) from None
        _check_count(len(events))
        if version == 2:
            for i, event in enumerate(events):
                try:
                    refuse_process_index(event)
                except EventFormatError as exc:
                    raise BadBatch(400, "malformed", f"event {i}: {exc}") from None
            return collector, seq, events
        try:
            processes = _PROCESSES.decode(head.processes) if head.processes else []
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            message = explain_row_error(str(exc), None, in_list=True).replace("event", "process")
            raise BadBatch(400, "malformed", f"batch processes: {message}") from None
        _place_processes(events, processes)
        return collector, seq, events
    if isinstance(raw, msgspec.Raw):  # version 1 in msgpack: maps
        try:
            raw = msgpack.unpackb(raw, raw=False, strict_map_key=True) if raw else None
        except (ValueError, msgpack.UnpackException) as exc:
            raise BadBatch(400, "malformed", f"batch events are not msgpack: {exc}") from None
    if not isinstance(raw, list):
        raise BadBatch(400, "malformed", "batch events is not a list")
    _check_count(len(raw))
    events = []
    for i, item in enumerate(raw):
        try:
            event = from_dict(_bytes_back(item) if from_json else item)
        except EventFormatError as exc:
            raise BadBatch(400, "malformed", f"event {i}: {exc}") from None
        if isinstance(event, Alert):
            raise BadBatch(400, "malformed", f"event {i}: collectors send events, not alerts")
        events.append(event)
    return collector, seq, events


def event_from_json(d: Any) -> AnyEvent:
    """An event from a json_line() object read back with json.loads (a line of the file
    `--events` writes), its bytes fields made bytes again and every field's type checked;
    EventFormatError when it is not an event (an alert is not one)."""
    event = from_dict(_bytes_back(d))
    if isinstance(event, Alert):
        raise EventFormatError("an alert, not an event")
    return event  # type: ignore[no-any-return]


def _place_processes(events: list[AnyEvent], processes: list[Process]) -> None:
    """Put each event's process in place of its index into the batch's table; BadBatch when
    an event has its process inline or an index the table lacks."""
    n = len(processes)
    for i, event in enumerate(events):
        if event.__class__ is LostEvent:
            continue
        index: Any = event.process  # type: ignore[union-attr]
        if index.__class__ is int and 0 <= index < n:
            event.process = processes[index]  # type: ignore[union-attr]
        elif index.__class__ is int:
            raise BadBatch(
                400, "malformed", f"event {i}: process {index}: the batch has {n} processes"
            )
        else:
            raise BadBatch(
                400,
                "malformed",
                f"event {i}: process: in a version {BATCH_VERSION} "
                "batch, an index into the batch's processes",
            )


def _row_error(message: str, raw: msgspec.Raw) -> str:
    """Which event of the batch, and which of its fields, msgspec's message is about."""
    try:
        rows = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        rows = None
    return explain_row_error(message, rows, in_list=True)


def _check_count(n: int) -> None:
    if n > MAX_BATCH_EVENTS:
        raise BadBatch(413, "too_large", f"batch has {n} events; at most {MAX_BATCH_EVENTS}")


def _bytes_fields(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """An event type's fields of type bytes, and of type list[bytes]."""
    fields = fields_of(cls)
    return (
        tuple(f.name for f in fields if f.type is bytes),
        tuple(f.name for f in fields if f.type == list[bytes]),
    )


# event kind -> (its bytes fields, its list[bytes] fields)
_BYTES_FIELDS = {kind: _bytes_fields(cls) for kind, cls in EVENT_TYPES.items() if cls is not Alert}
_PROCESS_BYTES = _bytes_fields(Process)
_ANCESTOR_BYTES = _bytes_fields(AncestorRef)


def _bytes_back(d: Any) -> Any:
    """A JSON event map with its bytes fields made bytes again (in place); anything that is
    not the shape of an event is left for from_dict to refuse, and a bytes field that is not
    text raises EventFormatError."""
    if not isinstance(d, dict):
        return d
    kind = d.get("kind")
    spec = _BYTES_FIELDS.get(kind) if isinstance(kind, str) else None
    if spec is None:
        return d
    try:
        _convert(d, spec)
        process = d.get("process")
        if isinstance(process, dict):
            _convert(process, _PROCESS_BYTES)
            ancestry = process.get("ancestry")
            if isinstance(ancestry, list):
                for ancestor in ancestry:
                    if isinstance(ancestor, dict):
                        _convert(ancestor, _ANCESTOR_BYTES)
    except (TypeError, AttributeError, UnicodeError) as exc:
        raise EventFormatError(f"{kind} event has a bytes field that is not text: {exc}") from None
    return d


def _convert(d: dict[str, Any], spec: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
    scalars, lists = spec
    for name in scalars:
        if name in d:
            d[name] = bytes_from_json(d[name])
    for name in lists:
        if name in d:
            values = d[name]
            if not isinstance(values, list):
                raise TypeError(f"{name} is not a list")
            d[name] = [bytes_from_json(s) for s in values]
