#!/usr/bin/python3
"""A static file server for tests that logs every request as a JSON line.

    http_server.py --bind 198.51.100.1 --port 8000 --directory DIR --log FILE
                   [--tls-cert PEM --tls-key PEM]   # HTTPS

Each line of FILE: {"ts", "client", "method", "path", "status", "user_agent"}, flushed at
once. Standard library only.
"""

from __future__ import annotations

import argparse
import functools
import json
import ssl
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any, ClassVar


class Handler(SimpleHTTPRequestHandler):
    log_file: ClassVar[IO[str] | None] = None

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        super().log_request(code, size)
        if self.log_file is None:
            return
        entry: dict[str, Any] = {
            "ts": time.time(),
            "client": self.client_address[0],
            "method": self.command,
            "path": self.path,
            "status": int(code) if str(code).isdigit() else code,
            "user_agent": self.headers.get("User-Agent", ""),
        }
        self.log_file.write(json.dumps(entry) + "\n")
        self.log_file.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--directory", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    args = parser.parse_args()
    with open(args.log, "a", encoding="utf-8") as log:  # noqa: PTH123 - keep it plain stdlib
        Handler.log_file = log
        handler = functools.partial(Handler, directory=args.directory)
        with ThreadingHTTPServer((args.bind, args.port), handler) as server:
            if args.tls_cert:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(args.tls_cert, args.tls_key)
                server.socket = ctx.wrap_socket(server.socket, server_side=True)
            server.serve_forever()


if __name__ == "__main__":
    main()
