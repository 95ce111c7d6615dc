"""service.outputs without receivers: configuration, what each output takes, queue limits,
metrics. (Delivery to real receivers is in tests/e2e/test_siem_outputs.py.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from api.events import Alert, AnyEvent, LostEvent
from service.outputs.config import OutputConfigError, outputs_from_config
from service.outputs.http import ElasticsearchOutput, SplunkHecOutput
from service.outputs.jsonl import JsonlOutput
from service.outputs.metrics import prometheus_lines
from service.outputs.syslog import SyslogOutput
from tests.unit.test_schemas import alert, exec_event, lost_event


@pytest.fixture
def secret(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    return str(path)


def test_defaults(tmp_path: Path, secret: str) -> None:
    outs = outputs_from_config(
        [
            {"type": "jsonl", "path": str(tmp_path / "a.jsonl")},
            {"type": "syslog", "address": "127.0.0.1:6514"},
            {
                "type": "splunk_hec",
                "url": "https://h/services/collector/event",
                "token_file": secret,
            },
            {
                "type": "elasticsearch",
                "url": "https://es:9200/",
                "index": "st",
                "api_key_file": secret,
            },
        ]
    )
    jsonl, syslog, hec, es = outs
    assert [o.name for o in outs] == ["jsonl0", "syslog1", "splunk_hec2", "elasticsearch3"]
    assert [o.what for o in outs] == ["both"] * 4
    assert [o.schema_name for o in outs] == ["native"] * 4
    assert [o.queue_size for o in outs] == [10000] * 4
    assert isinstance(jsonl, JsonlOutput)
    assert (jsonl.max_bytes, jsonl.backups) == (0, 5)
    assert isinstance(syslog, SyslogOutput)
    assert (syslog.host, syslog.port, syslog.app_name, syslog.facility) == (
        "127.0.0.1",
        6514,
        "sandtrace",
        1,
    )
    assert syslog.ssl is None
    assert isinstance(hec, SplunkHecOutput)
    assert hec.headers == {"Content-Type": "application/json", "Authorization": "Splunk s3cret"}
    assert (hec.sourcetype, hec.index) == ("sandtrace", None)
    assert isinstance(es, ElasticsearchOutput)
    assert es.url == "https://es:9200/_bulk"
    assert es.headers == {"Content-Type": "application/x-ndjson", "Authorization": "ApiKey s3cret"}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"type": "kafka"},
            "[[output]] #1 type: 'kafka' is not an output type; expected one of elasticsearch, "
            "jsonl, splunk_hec, syslog",
        ),
        (
            {"type": "jsonl", "name": "f", "path": "/tmp/x", "colour": 1},
            "[[output]] #1 (f) colour: unknown key for a jsonl output (expected one of type, "
            "name, what, schema, queue, batch, backoff, backoff_max, path, max_bytes, backups)",
        ),
        ({"type": "jsonl"}, "[[output]] #1 path: missing; expected it (type jsonl requires it)"),
        (
            {"type": "jsonl", "path": "/tmp/x", "what": "all"},
            "[[output]] #1 what: 'all': expected one of events, alerts, both",
        ),
        (
            {"type": "jsonl", "path": "/tmp/x", "schema": "cef"},
            "[[output]] #1 schema: 'cef': expected one of native, ecs, ocsf",
        ),
        (
            {"type": "jsonl", "path": "/tmp/x", "queue": 0},
            "[[output]] #1 queue: 0: expected at least 1",
        ),
        (
            {"type": "jsonl", "path": "/tmp/x", "queue": "10"},
            "[[output]] #1 queue: '10' is a string; expected an integer",
        ),
        (
            {"type": "jsonl", "path": "/tmp/x", "queue": True},
            "[[output]] #1 queue: True is a boolean; expected an integer",
        ),
        (
            {"type": "jsonl", "path": "/nonexistent/dir/x"},
            "[[output]] #1 path: directory /nonexistent/dir does not exist; expected the path of "
            "a file in an existing directory",
        ),
        (
            {"type": "syslog", "address": "localhost"},
            "[[output]] #1 address: 'localhost': expected HOST:PORT with a port 1-65535",
        ),
        (
            {"type": "syslog", "address": "h:514", "facility": "local9"},
            "[[output]] #1 facility: 'local9': expected a facility name (e.g. local0) or 0-23",
        ),
        (
            {"type": "syslog", "address": "h:514", "ca_file": "/etc/hostname"},
            "[[output]] #1 ca_file: '/etc/hostname': expected tls = true with it (or no ca_file)",
        ),
        (
            {"type": "syslog", "address": "h:514", "tls": True, "ca_file": "/nonexistent"},
            "[[output]] #1 ca_file: cannot read /nonexistent: No such file or directory; expected "
            "a readable file",
        ),
        (
            {"type": "splunk_hec", "url": "h:8088", "token_file": "/etc/hostname"},
            "[[output]] #1 url: 'h:8088': expected http(s)://...",
        ),
        (
            {"type": "splunk_hec", "url": "http://h"},
            "[[output]] #1 token_file: missing; expected it (type splunk_hec requires it)",
        ),
        (
            {"type": "elasticsearch", "url": "http://h"},
            "[[output]] #1 index: missing; expected it (type elasticsearch requires it)",
        ),
    ],
)
def test_config_errors_name_output_and_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(OutputConfigError) as info:
        outputs_from_config([section])
    assert str(info.value) == message


def test_config_error_names_the_index_of_the_bad_output(tmp_path: Path) -> None:
    ok = {"type": "jsonl", "path": str(tmp_path / "a")}
    with pytest.raises(OutputConfigError) as info:
        outputs_from_config(
            [ok, {**ok, "name": "b", "path": str(tmp_path / "b")}, {**ok, "batch": 0}]
        )
    assert info.value.problems == [
        "[[output]] #3 batch: 0: expected at least 1",
        f"[[output]] #3 path: {tmp_path / 'a'} is also written by [[output]] #1; expected a "
        "file of its own for each output",
    ]
    with pytest.raises(OutputConfigError) as info:
        outputs_from_config([{**ok, "name": "x"}, {**ok, "name": "x", "path": str(tmp_path / "b")}])
    assert info.value.problems == [
        "[[output]] #2 (x) name: 'x' is also the name of [[output]] #1 (x); expected a name of "
        "its own"
    ]


def test_every_problem_is_listed_and_a_ca_file_must_hold_a_certificate(tmp_path: Path) -> None:
    not_a_cert = tmp_path / "ca.pem"
    not_a_cert.write_text("not a certificate\n")
    syslog = {"type": "syslog", "address": "h:514", "tls": True, "ca_file": str(not_a_cert)}
    with pytest.raises(OutputConfigError) as info:
        outputs_from_config(
            [syslog, {"type": "jsonl", "path": "-", "queue": "many", "what": "all"}],
            ["s.toml: [[output]] #1", "s.toml: [[output]] #2"],
        )
    first, *rest = info.value.problems
    assert first.startswith(
        f"s.toml: [[output]] #1 ca_file: {not_a_cert} holds no usable certificate ("
    ) and first.endswith("); expected PEM CA certificates")
    assert rest == [
        "s.toml: [[output]] #2 queue: 'many' is a string; expected an integer",
        "s.toml: [[output]] #2 what: 'all': expected one of events, alerts, both",
    ]


def test_wants(tmp_path: Path) -> None:
    events, alerts, both = outputs_from_config(
        [
            {"type": "jsonl", "path": str(tmp_path / w), "what": w}
            for w in ("events", "alerts", "both")
        ]
    )
    items: list[AnyEvent | Alert] = [exec_event(), lost_event(), alert()]
    assert [events.wants(i) for i in items] == [True, True, False]
    assert [alerts.wants(i) for i in items] == [False, False, True]
    assert [both.wants(i) for i in items] == [True, True, True]


def test_submit_never_blocks_and_counts_drops(tmp_path: Path) -> None:
    (out,) = outputs_from_config(
        [{"type": "jsonl", "name": "f", "path": str(tmp_path / "x"), "queue": 3, "what": "events"}]
    )
    for _ in range(5):
        out.submit(exec_event())
    out.submit(alert())  # not wanted: neither queued nor dropped
    assert out.depth() == 3
    assert out.stats.queued == 3
    assert out.stats.dropped == {"queue_full": 2}
    lines = prometheus_lines([out])
    assert lines == [
        "# HELP sandtrace_output_sent_total Items delivered, per output",
        "# TYPE sandtrace_output_sent_total counter",
        'sandtrace_output_sent_total{output="f"} 0.0',
        "# HELP sandtrace_output_dropped_total Items lost, per output and cause",
        "# TYPE sandtrace_output_dropped_total counter",
        'sandtrace_output_dropped_total{cause="format_error",output="f"} 0.0',
        'sandtrace_output_dropped_total{cause="queue_full",output="f"} 2.0',
        'sandtrace_output_dropped_total{cause="rejected",output="f"} 0.0',
        'sandtrace_output_dropped_total{cause="shutdown",output="f"} 0.0',
        "# HELP sandtrace_output_retries_total Failed deliveries retried, per output",
        "# TYPE sandtrace_output_retries_total counter",
        'sandtrace_output_retries_total{output="f"} 0.0',
        "# HELP sandtrace_output_queue Items waiting or in delivery, per output",
        "# TYPE sandtrace_output_queue gauge",
        'sandtrace_output_queue{output="f"} 3.0',
    ]


def test_metric_labels_are_escaped(tmp_path: Path) -> None:
    (out,) = outputs_from_config([{"type": "jsonl", "name": 'a"b\\', "path": str(tmp_path / "x")}])
    assert 'sandtrace_output_sent_total{output="a\\"b\\\\"} 0.0' in prometheus_lines([out])


@pytest.mark.asyncio
async def test_jsonl_to_file_and_close(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    (out,) = outputs_from_config([{"type": "jsonl", "path": str(path), "schema": "ocsf"}])
    await out.start()
    lost = LostEvent(time_ns=1, host="h", kernel={}, user=0, errors={})
    out.submit(lost)
    await out.aclose(deadline=5)
    assert out.stats.sent == 1
    assert out.stats.dropped == {}
    (line,) = path.read_text().splitlines()
    assert json.loads(line)["class_uid"] == 6008
    out.submit(lost)  # after close: counted, not queued
    assert out.stats.dropped == {"shutdown": 1}


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.asyncio
async def test_jsonl_follows_a_file_moved_away_by_logrotate(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    (out,) = outputs_from_config([{"type": "jsonl", "path": str(path)}])
    await out.start()
    lost = LostEvent(time_ns=1, host="h", kernel={}, user=0, errors={})
    try:
        out.submit(lost)
        for _ in range(200):
            if out.stats.sent == 1:
                break
            await asyncio.sleep(0.01)
        await asyncio.to_thread(path.rename, tmp_path / "events.jsonl.1")  # logrotate's move
        out.submit(lost)
        out.submit(lost)
        for _ in range(200):
            if out.stats.sent == 3:
                break
            await asyncio.sleep(0.01)
    finally:
        await out.aclose(deadline=5)
    counts = await asyncio.to_thread(lambda: (_lines(tmp_path / "events.jsonl.1"), _lines(path)))
    assert counts == (1, 2)  # the old file kept its line, the new one has the rest
