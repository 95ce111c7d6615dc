#!/usr/bin/python3
"""A tiny stand-in for a cryptominer: logs in to a stratum pool, waits for a job, exits 0.

Takes xmrig's flags (others xmrig knows are accepted and ignored):

    miner.py -o stratum+tcp://HOST:PORT -u WALLET -p x --donate-level=0 --cpu-priority=0
    miner.py -c config.json   # {"pools": [{"url": "...", "user": "...", "pass": "x"}]}

Speaks xmrig's `login` dialect by default; `--proto stratum1` uses `mining.subscribe` and
`mining.authorize` instead. Pools of a config file are tried in order (those with
`"enabled": false` skipped). Exit 0 once a job arrived, 1 if no pool gave one, 2 on usage
errors. Standard library only, so it runs copied anywhere under any name.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

AGENT = "XMRig/6.21.0 (Linux x86_64) libuv/1.44.2 gcc/12.2.0"
TIMEOUT = 10.0


class PoolError(Exception):
    pass


def parse_url(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[1] if "://" in url else url
    if "://" in url and not url.startswith(("stratum+tcp://", "stratum://", "tcp://")):
        raise PoolError(f"unsupported pool scheme in {url!r} (only plain TCP)")
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise PoolError(f"pool url {url!r} is not [stratum+tcp://]HOST:PORT")
    return host, int(port)


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.reader = self.sock.makefile("rb")
        self.next_id = 1

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def send(self, method: str, params: Any) -> int:
        req_id = self.next_id
        self.next_id += 1
        msg = {"id": req_id, "jsonrpc": "2.0", "method": method, "params": params}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        return req_id

    def receive(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise PoolError("pool closed the connection")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise PoolError(f"pool sent {line!r}")
        return msg

    def call(self, method: str, params: Any) -> tuple[Any, list[dict[str, Any]]]:
        """Send a request; return its result and the notifications that came before it."""
        req_id = self.send(method, params)
        notes: list[dict[str, Any]] = []
        while True:
            msg = self.receive()
            if msg.get("id") == req_id:
                if msg.get("error"):
                    raise PoolError(f"{method}: {msg['error']}")
                return msg.get("result"), notes
            notes.append(msg)


def mine_xmrig(conn: Connection, pool: dict[str, Any]) -> str:
    params = {
        "login": pool["user"],
        "pass": pool.get("pass", "x"),
        "agent": AGENT,
        "algo": ["rx/0", "cn/r"],
    }
    if pool.get("rig-id"):
        params["rigid"] = pool["rig-id"]
    res, _ = conn.call("login", params)
    if not isinstance(res, dict) or not isinstance(res.get("job"), dict):
        raise PoolError(f"login gave no job: {res!r}")
    job = res["job"]
    return f"job {job.get('job_id')} algo {job.get('algo')} height {job.get('height')}"


def mine_stratum1(conn: Connection, pool: dict[str, Any]) -> str:
    conn.call("mining.subscribe", [AGENT])
    ok, notes = conn.call("mining.authorize", [pool["user"], pool.get("pass", "x")])
    if ok is not True:
        raise PoolError(f"authorize refused: {ok!r}")
    while not any(n.get("method") == "mining.notify" for n in notes):
        notes.append(conn.receive())
    job = next(n for n in notes if n.get("method") == "mining.notify")
    return f"job {job['params'][0]}"


def pools_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.config:
        config = json.loads(Path(args.config).read_text())
        pools = [p for p in config.get("pools", []) if p.get("enabled", True)]
        if not pools:
            raise PoolError(f"{args.config}: no enabled pool")
        return [p for p in pools if isinstance(p, dict)]
    if not args.url or not args.user:
        raise PoolError("give -o URL -u WALLET, or -c CONFIG")
    return [{"url": args.url, "user": args.user, "pass": args.password, "rig-id": args.rig_id}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--url")
    parser.add_argument("-u", "--user")
    parser.add_argument("-p", "--pass", dest="password", default="x")
    parser.add_argument("-c", "--config")
    parser.add_argument("--rig-id")
    parser.add_argument("--proto", choices=["xmrig", "stratum1"], default="xmrig")
    for ignored in (
        "--donate-level",
        "--cpu-priority",
        "-a",
        "--algo",
        "-t",
        "--threads",
        "--coin",
        "--log-file",
    ):
        parser.add_argument(ignored, help=argparse.SUPPRESS)
    for ignored in ("-B", "--background", "-k", "--keepalive", "--no-color", "--tls"):
        parser.add_argument(ignored, action="store_true", help=argparse.SUPPRESS)
    args, _unknown = parser.parse_known_args(argv)
    try:
        pools = pools_from_args(args)
    except (PoolError, OSError, ValueError) as exc:
        print(f"miner: {exc}", file=sys.stderr)
        return 2
    mine = mine_stratum1 if args.proto == "stratum1" else mine_xmrig
    for pool in pools:
        try:
            host, port = parse_url(str(pool["url"]))
            conn = Connection(host, port)
            try:
                got = mine(conn, pool)
            finally:
                conn.close()
        except (PoolError, OSError, ValueError, KeyError) as exc:
            print(f"miner: pool {pool.get('url')}: {exc}", file=sys.stderr)
            continue
        print(f"miner: logged in to {host}:{port} as {pool['user']}, new {got}", flush=True)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
