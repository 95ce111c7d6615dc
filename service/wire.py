"""The batch wire format between collectors and the detection service.

A batch is a map:
    {"v": <batch version>, "collector": "<id>", "seq": <int>, "events": [...]}
Version 2 (what collectors send, msgpack ``application/msgpack``): each event is a row,
collector.events.to_row(): its kind, then its fields in order, bytes as bin. Version 1: each
event is a map, collector.events.to_dict(), in msgpack or in JSON (``application/json``,
bytes fields as strings the way collector.render.json_line writes them, read back with
bytes_from_json); JSON batches are always version 1, the readable form for other producers.
decode_batch() accepts any bytes and either returns the batch, every event's field types
checked, or raises BadBatch with the HTTP status and a reason, whichever the format.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
import msgspec

from collector.events import (
    EVENT_TYPES,
    Alert,
    AncestorRef,
    AnyEvent,
    EventFormatError,
    Process,
    RowEvent,
    explain_row_error,
    fields_of,
    from_dict,
)
from collector.render import bytes_from_json, json_line

BATCH_VERSION = 2  # rows; version 1 (maps) is still read
BATCH_VERSIONS = (1, 2)
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
    events: msgspec.Raw = msgspec.Raw()


class _Batch(msgspec.Struct, gc=False):
    """A well-formed version 2 batch, decoded in one pass (the usual case)."""

    v: int
    collector: str
    seq: int
    events: list[RowEvent]


_HEAD = msgspec.msgpack.Decoder(_Head)
_BATCH = msgspec.msgpack.Decoder(_Batch)
_ROWS = msgspec.msgpack.Decoder(list[RowEvent])
_ENCODER = msgspec.msgpack.Encoder()


def encode_batch(collector: str, seq: int, events: list[AnyEvent], fmt: str = "msgpack") -> bytes:
    """A batch as collectors send it (the inverse of decode_batch), as "msgpack" or "json"."""
    if fmt == "json":
        head = json.dumps({"v": 1, "collector": collector, "seq": seq})
        return f'{head[:-1]}, "events": [{",".join(map(json_line, events))}]}}'.encode()
    if fmt != "msgpack":
        raise ValueError(f"batch format {fmt!r}: msgpack or json")
    # events encode as their rows (collector.events: a record's encoding is its row)
    body = {"v": BATCH_VERSION, "collector": collector, "seq": seq, "events": events}
    return _ENCODER.encode(body)


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
        version, collector, seq, raw = (batch.get("v"), batch.get("collector"), batch.get("seq"),
                                        batch.get("events"))  # fmt: skip
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
            return batch.collector, batch.seq, batch.events
        try:
            head = _HEAD.decode(body)
        except msgspec.ValidationError:
            raise BadBatch(400, "malformed", "batch is not a map of v, collector, seq and "
                           "events") from None  # fmt: skip
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise BadBatch(400, "malformed", f"body is not msgpack: {exc}") from None
        version, collector, seq, raw = head.v, head.collector, head.seq, head.events
    else:
        wanted = " or ".join(CONTENT_TYPES)
        raise BadBatch(415, "content_type", f"send {wanted}, not {content_type}")
    if version not in BATCH_VERSIONS or (from_json and version != 1):
        readable = "version 1" if from_json else "versions 1 and 2"
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
    if version == 2:
        if not isinstance(raw, msgspec.Raw) or not raw:
            raise BadBatch(400, "malformed", "batch events is not a list")
        try:
            events: list[AnyEvent] = _ROWS.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise BadBatch(400, "malformed", _row_error(str(exc), raw)) from None
        _check_count(len(events))
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
