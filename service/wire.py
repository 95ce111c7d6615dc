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

import dataclasses
import json
from typing import Any

import msgpack

from collector.events import (
    EVENT_TYPES,
    Alert,
    AncestorRef,
    AnyEvent,
    EventFormatError,
    Process,
    from_dict,
    from_row,
    to_row,
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


def encode_batch(collector: str, seq: int, events: list[AnyEvent], fmt: str = "msgpack") -> bytes:
    """A batch as collectors send it (the inverse of decode_batch), as "msgpack" or "json"."""
    if fmt == "json":
        head = json.dumps({"v": 1, "collector": collector, "seq": seq})
        return f'{head[:-1]}, "events": [{",".join(map(json_line, events))}]}}'.encode()
    if fmt != "msgpack":
        raise ValueError(f"batch format {fmt!r}: msgpack or json")
    body = {"v": BATCH_VERSION, "collector": collector, "seq": seq,
            "events": [to_row(e) for e in events]}  # fmt: skip
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def decode_batch(body: bytes, content_type: str = CONTENT_TYPE) -> tuple[str, int, list[AnyEvent]]:
    """A batch's collector id, sequence number and events; BadBatch says what is wrong."""
    from_json = content_type == JSON_CONTENT_TYPE
    if from_json:
        try:
            batch = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise BadBatch(400, "malformed", f"body is not JSON: {exc}") from None
    elif content_type == CONTENT_TYPE:
        try:
            batch = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except (ValueError, msgpack.UnpackException) as exc:
            raise BadBatch(400, "malformed", f"body is not msgpack: {exc}") from None
    else:
        wanted = " or ".join(CONTENT_TYPES)
        raise BadBatch(415, "content_type", f"send {wanted}, not {content_type}")
    if not isinstance(batch, dict):
        raise BadBatch(400, "malformed", "batch is not a map")
    version = batch.get("v")
    if version not in BATCH_VERSIONS or (from_json and version != 1):
        readable = "version 1" if from_json else "versions 1 and 2"
        raise BadBatch(
            409,
            "version",
            f"batch wire version {version!r} is not supported; this service reads "
            f"{readable}{' of JSON batches' if from_json else ''}",
        )
    collector, seq, raw = batch.get("collector"), batch.get("seq"), batch.get("events")
    if not isinstance(collector, str) or not collector:
        raise BadBatch(400, "malformed", "batch has no collector id")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise BadBatch(400, "malformed", "batch has no sequence number")
    if not isinstance(raw, list):
        raise BadBatch(400, "malformed", "batch events is not a list")
    if len(raw) > MAX_BATCH_EVENTS:
        raise BadBatch(413, "too_large", f"batch has {len(raw)} events; at most {MAX_BATCH_EVENTS}")
    if version == 2:
        try:
            return collector, seq, [from_row(item) for item in raw]
        except EventFormatError:
            events = []  # find which event, for the message
            for i, item in enumerate(raw):
                try:
                    events.append(from_row(item))
                except EventFormatError as exc:
                    raise BadBatch(400, "malformed", f"event {i}: {exc}") from None
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


def _bytes_fields(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A dataclass's fields of type bytes, and of type list[bytes]."""
    fields = dataclasses.fields(cls)
    return (
        tuple(f.name for f in fields if f.type in ("bytes", bytes)),
        tuple(f.name for f in fields if f.type in ("list[bytes]", list[bytes])),
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
