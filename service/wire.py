"""The batch wire format between collectors and the detection service.

A batch is a msgpack map:
    {"v": WIRE_VERSION, "collector": "<id>", "seq": <int>, "events": [<event map>, ...]}
where each event map is collector.events.to_dict() of an event. decode_batch() accepts any
bytes and either returns the batch or raises BadBatch with the HTTP status and a reason.
"""

from __future__ import annotations

import msgpack

from collector.events import WIRE_VERSION, Alert, AnyEvent, EventFormatError, from_dict, to_dict

MAX_BATCH_BYTES = 8 << 20
MAX_BATCH_EVENTS = 50_000
CONTENT_TYPE = "application/msgpack"


class BadBatch(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def encode_batch(collector: str, seq: int, events: list[AnyEvent]) -> bytes:
    """A batch as collectors send it (the inverse of decode_batch)."""
    body = {"v": WIRE_VERSION, "collector": collector, "seq": seq,
            "events": [to_dict(e) for e in events]}  # fmt: skip
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def decode_batch(body: bytes) -> tuple[str, int, list[AnyEvent]]:
    """A batch's collector id, sequence number and events; BadBatch says what is wrong."""
    try:
        batch = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise BadBatch(400, "malformed", f"body is not msgpack: {exc}") from None
    if not isinstance(batch, dict):
        raise BadBatch(400, "malformed", "batch is not a map")
    version = batch.get("v")
    if version != WIRE_VERSION:
        raise BadBatch(
            409,
            "version",
            f"batch wire version {version!r} is not supported; this service reads "
            f"version {WIRE_VERSION}",
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
    events: list[AnyEvent] = []
    for i, item in enumerate(raw):
        try:
            event = from_dict(item)
        except EventFormatError as exc:
            raise BadBatch(400, "malformed", f"event {i}: {exc}") from None
        if isinstance(event, Alert):
            raise BadBatch(400, "malformed", f"event {i}: collectors send events, not alerts")
        events.append(event)
    return collector, seq, events
