"""The service acknowledges a batch once its file outputs have it, not waiting on the network."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from detect.testing import event_from_fields
from service.main import OutputGate
from service.outputs import outputs_from_config
from tests.serving import free_port


@pytest.mark.asyncio
async def test_settle_waits_for_files_not_for_an_unreachable_siem(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    outputs = outputs_from_config([
        {"type": "jsonl", "path": str(path), "what": "events"},
        {"type": "syslog", "address": f"127.0.0.1:{free_port()}", "what": "events"},
    ])  # fmt: skip
    for out in outputs:
        await out.start()
    gate = OutputGate(outputs, wait=60.0)
    try:
        assert bool(gate) and [o.output_type for o in gate.outputs] == ["jsonl"]
        for pid in range(25):
            gate.submit(event_from_fields("process_creation", {"ProcessId": pid}))
        async with asyncio.timeout(30):  # waiting on the dead receiver would take 60 s
            await gate.settle()
        lines = await asyncio.to_thread(lambda: path.read_text().splitlines())
        assert len(lines) == 25  # written before the acknowledgement
        assert outputs[1].stats.sent == 0 and outputs[1].depth() == 25
    finally:
        for out in outputs:
            await out.aclose(0.1)
    assert outputs[1].stats.dropped["shutdown"] == 25


def test_no_file_output_means_nothing_to_wait_for() -> None:
    outputs = outputs_from_config([{"type": "syslog", "address": "127.0.0.1:9"}])
    assert not OutputGate(outputs)
