"""The fleet's JetStream streams and lease bucket: their settings, created when missing and
checked when present (by every worker at start, and by `sandtrace serve --check-config`).

    SANDTRACE_EVENTS   the collectors' batches, subject-mapped to `partitions` partitions;
                       de-duplicated by batch id within `duplicate_window` seconds
    SANDTRACE_ALERTS   every alert once (ids derived from the batch that raised it)
    SANDTRACE_SIEM     the events of each batch in a SIEM schema, where configured
    sandtrace-partitions (KV)  which worker holds which partition: leases of `lease_seconds`
    sandtrace-expiry (KV)      per partition, the wall time up to which its owner ended fold
                               windows and published their summaries (kept without a limit:
                               the next owner reads it after the lease is gone)

The number of partitions is fixed when the events stream is made: a host's partition is
the hash of its name modulo that number, and a stream already holding batches keeps its
mapping. A check that finds another number says so instead of changing it. Retention
(max_age, max_bytes) and replicas are brought to the configured values on start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleet import names


class FleetSetupError(Exception):
    """The streams cannot be made or do not match the configuration; the message says why."""


@dataclass(slots=True)
class FleetSettings:
    partitions: int = 16
    replicas: int = 3
    events_max_age: float = 24 * 3600.0  # seconds
    events_max_bytes: int = -1  # -1: no bound but max_age
    alerts_max_age: float = 30 * 24 * 3600.0
    alerts_max_bytes: int = -1
    duplicate_window: float = 600.0
    lease_seconds: float = 10.0
    ack_wait: float = 30.0
    rebuild_seconds: float = -1.0  # -1: the rules' longest window (and the fold span)
    siem_events: tuple[str, ...] = ()  # schemas whose event lines are published

    def check(self) -> None:
        """ValueError naming the setting that is out of range."""
        if not 1 <= self.partitions <= 1024:
            raise ValueError("fleet.partitions must be 1 to 1024")
        if self.replicas not in (1, 3, 5):
            raise ValueError("fleet.replicas must be 1, 3 or 5 (JetStream's quorum sizes)")
        for name in ("events_max_age", "alerts_max_age", "duplicate_window", "lease_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"fleet.{name} must be a positive number of seconds")
        if self.ack_wait < 2 * self.lease_seconds:
            raise ValueError("fleet.ack_wait must be at least twice fleet.lease_seconds")
        if self.duplicate_window > self.events_max_age:
            raise ValueError("fleet.duplicate_window cannot exceed fleet.events_max_age")


def _stream_configs(s: FleetSettings) -> list[Any]:
    from nats.js.api import (  # noqa: PLC0415
        DiscardPolicy,
        RetentionPolicy,
        StorageType,
        StreamConfig,
        SubjectTransform,
    )

    source, destination = names.partition_transform(s.partitions)
    common: dict[str, Any] = {
        "retention": RetentionPolicy.LIMITS,
        "storage": StorageType.FILE,
        "num_replicas": s.replicas,
        "discard": DiscardPolicy.OLD,
        "duplicate_window": s.duplicate_window,
    }
    return [
        StreamConfig(
            name=names.EVENTS_STREAM,
            description="sandtrace collectors' batches, one subject per host",
            subjects=[source],
            subject_transform=SubjectTransform(src=source, dest=destination),
            max_age=s.events_max_age,
            max_bytes=s.events_max_bytes,
            max_msg_size=8 << 20,
            **common,
        ),
        StreamConfig(
            name=names.ALERTS_STREAM,
            description="sandtrace alerts, once each",
            subjects=[f"{names.ALERTS_PREFIX}.*"],
            max_age=s.alerts_max_age,
            max_bytes=s.alerts_max_bytes,
            **common,
        ),
        StreamConfig(
            name=names.SIEM_STREAM,
            description="sandtrace events in SIEM schemas, one message per batch and schema",
            subjects=[f"{names.SIEM_PREFIX}.*.*"],
            max_age=s.events_max_age,
            max_bytes=s.events_max_bytes,
            **common,
        ),
    ]


async def ensure(js: Any, s: FleetSettings, *, create: bool = True) -> list[str]:
    """Make what is missing (unless not `create`), bring limits to the settings, and return
    notes; FleetSetupError when something present cannot match (another partition count)."""
    from nats.js.api import KeyValueConfig  # noqa: PLC0415
    from nats.js.errors import NotFoundError  # noqa: PLC0415

    notes: list[str] = []
    for config in _stream_configs(s):
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            if not create:
                notes.append(f"stream {config.name} missing (a worker makes it when it starts)")
                continue
            await js.add_stream(config)
            notes.append(f"stream {config.name} made ({s.replicas} replicas)")
            continue
        have = info.config
        if config.subject_transform is not None:
            want = config.subject_transform.dest
            got = have.subject_transform.dest if have.subject_transform else None
            if got != want:
                raise FleetSetupError(
                    f"stream {config.name} maps hosts as {got!r}, not {want!r}: it was made "
                    f"with another fleet.partitions; use that number, or delete the stream "
                    f"(its batches with it) to change it"
                )
        changed = [
            key
            for key in ("max_age", "max_bytes", "duplicate_window", "num_replicas")
            if getattr(have, key) != getattr(config, key)
        ]
        if changed:
            if create:
                await js.update_stream(config)
                notes.append(f"stream {config.name}: {', '.join(changed)} updated")
            else:
                notes.append(
                    f"stream {config.name}: {', '.join(changed)} differ (updated at start)"
                )
    try:
        await js.key_value(names.LEASES_BUCKET)
    except (NotFoundError, Exception) as exc:  # the client raises BucketNotFoundError
        if type(exc).__name__ not in ("BucketNotFoundError", "NotFoundError"):
            raise
        found = False
    else:
        found = True
    if found:
        # A lease lives as long as the bucket keeps a key: its age limit is the lease length.
        # Workers that renew every lease/4 with keys kept for less would lose their leases.
        info = await js.stream_info(f"KV_{names.LEASES_BUCKET}")
        if abs((info.config.max_age or 0) - s.lease_seconds) > 0.001:
            if create:
                info.config.max_age = s.lease_seconds
                info.config.duplicate_window = min(
                    info.config.duplicate_window or 0, s.lease_seconds
                )
                await js.update_stream(info.config)
                notes.append(f"lease bucket {names.LEASES_BUCKET}: lease length updated")
            else:
                notes.append(
                    f"lease bucket {names.LEASES_BUCKET}: lease length {info.config.max_age:g} s, "
                    f"not {s.lease_seconds:g} s (updated at start; run every worker alike)"
                )
    elif create:
        await js.create_key_value(
            KeyValueConfig(
                bucket=names.LEASES_BUCKET,
                history=1,
                ttl=s.lease_seconds,
                replicas=s.replicas,
            )
        )
        notes.append(f"lease bucket {names.LEASES_BUCKET} made")
    else:
        notes.append(f"lease bucket {names.LEASES_BUCKET} missing (made at start)")
    try:
        await js.key_value(names.EXPIRY_BUCKET)
    except Exception as exc:  # the client raises BucketNotFoundError
        if type(exc).__name__ not in ("BucketNotFoundError", "NotFoundError"):
            raise
        if create:
            await js.create_key_value(
                KeyValueConfig(bucket=names.EXPIRY_BUCKET, history=1, replicas=s.replicas)
            )
            notes.append(f"expiry bucket {names.EXPIRY_BUCKET} made")
        else:
            notes.append(f"expiry bucket {names.EXPIRY_BUCKET} missing (made at start)")
    return notes
