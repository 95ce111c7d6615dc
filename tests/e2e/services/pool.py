#!/usr/bin/python3
"""A tiny stratum-style mining pool for tests: line-delimited JSON-RPC over TCP.

Answers stratum v1 (`mining.subscribe`, `mining.authorize`, `mining.submit`, ...) and the
xmrig/Monero dialect (`login` with a job, `submit`, `keepalived`). Every request is
appended to the JSON-lines file `--log` as `{"ts": ..., "peer": "IP:PORT", "request": ...}`
(lines that are not JSON as `{"ts", "peer", "invalid": "..."}`), flushed at once.

    pool.py --host 198.51.100.1 --port 3333 --log /tmp/pool.jsonl

Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from typing import IO, Any

JOB_BLOB = "0707" + "ab" * 37  # 76 bytes, the shape of a Monero hashing blob
SEED_HASH = "5e" * 32
_session = itertools.count(1)


def result(req_id: Any, value: Any) -> dict[str, Any]:
    return {"id": req_id, "jsonrpc": "2.0", "result": value, "error": None}


def notify(method: str, params: list[Any]) -> dict[str, Any]:
    return {"id": None, "method": method, "params": params}


def xmrig_job(session: int) -> dict[str, Any]:
    return {
        "blob": JOB_BLOB,
        "job_id": f"job-{session}-1",
        "target": "b88d0600",
        "algo": "rx/0",
        "height": 3000000 + session,
        "seed_hash": SEED_HASH,
    }


def respond(req: dict[str, Any], session: int) -> list[dict[str, Any]]:
    """The messages to send back for one request, in order."""
    method, req_id = req.get("method"), req.get("id")
    params = req.get("params")
    if method == "mining.subscribe":
        sub = f"{session:08x}"
        return [result(req_id, [[["mining.set_difficulty", sub], ["mining.notify", sub]], sub, 4])]
    if method == "mining.authorize":
        ok = isinstance(params, list) and len(params) >= 1 and bool(params[0])
        if not ok:
            return [result(req_id, False)]
        job = [
            f"{session:x}",
            "00" * 32,
            "01000000",
            "ffffffff",
            [],
            "20000000",
            "1d00ffff",
            f"{int(time.time()):08x}",
            True,
        ]
        return [
            result(req_id, True),
            notify("mining.set_difficulty", [1]),
            notify("mining.notify", job),
        ]
    if method in ("mining.submit", "mining.extranonce.subscribe", "mining.configure"):
        return [result(req_id, True)]
    if method == "login":
        if not isinstance(params, dict) or not params.get("login"):
            return [
                {
                    "id": req_id,
                    "jsonrpc": "2.0",
                    "result": None,
                    "error": {"code": -1, "message": "missing login"},
                }
            ]
        value = {
            "id": f"session-{session}",
            "job": xmrig_job(session),
            "extensions": ["algo", "keepalive"],
            "status": "OK",
        }
        return [result(req_id, value)]
    if method == "submit":
        return [result(req_id, {"status": "OK"})]
    if method == "keepalived":
        return [result(req_id, {"status": "KEEPALIVED"})]
    return [
        {
            "id": req_id,
            "jsonrpc": "2.0",
            "result": None,
            "error": {"code": -32601, "message": f"unknown method {method!r}"},
        }
    ]


class Pool:
    def __init__(self, log: IO[str]) -> None:
        self.log = log

    def record(self, entry: dict[str, Any]) -> None:
        self.log.write(json.dumps({"ts": time.time(), **entry}) + "\n")
        self.log.flush()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        peer = f"{host}:{port}"
        session = next(_session)
        try:
            while line := await reader.readline():
                if not line.strip():
                    continue
                try:
                    req = json.loads(line)
                except ValueError:
                    self.record({"peer": peer, "invalid": line.decode(errors="replace")})
                    continue
                self.record({"peer": peer, "request": req})
                if not isinstance(req, dict):
                    continue
                for msg in respond(req, session):
                    writer.write(json.dumps(msg).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def serve(host: str, port: int, pool: Pool) -> None:
    server = await asyncio.start_server(pool.handle, host, port, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3333)
    parser.add_argument("--log", required=True, help="JSON-lines file of every request")
    args = parser.parse_args()
    with open(args.log, "a", encoding="utf-8") as log:  # noqa: PTH123 - keep it plain stdlib
        asyncio.run(serve(args.host, args.port, Pool(log)))


if __name__ == "__main__":
    main()
