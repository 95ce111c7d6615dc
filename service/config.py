"""The detection service's configuration: a TOML file, overridden by the command line.

    [server]
    listen = "0.0.0.0:8780"              # HOST:PORT
    token_file = "/etc/sandtrace/token"  # collectors and tail clients send this bearer token
    tls_cert = "/etc/sandtrace/tls/service.pem"
    tls_key = "/etc/sandtrace/tls/service.key"
    insecure = false                     # allow plain HTTP on an address other than loopback
    state_dir = "/var/lib/sandtrace-service"  # each collector's last batch, across restarts
    read_timeout = 30.0                  # seconds a request body may take to arrive (else 408)

    [detection]
    rules = ["/etc/sandtrace/rules"]     # added to the built-in pack
    builtin_rules = true
    egress_allow = ["10.0.0.0/8", "sandbox-7=192.0.2.0/24:443"]
    fold_seconds = 60                    # repeats of a rule for one process within this
                                         # span are one alert with a count (0: each alone)

    [tail]
    enabled = true
    queue = 10000                        # items held per tail client before it misses some
    clients = 64                         # tail clients at once; more get a 503

    [[output]]                           # any number; see service/outputs.py
    type = "jsonl"
    path = "/var/log/sandtrace/alerts.jsonl"
    what = "alerts"

Every key is checked: an unknown key, a wrong type or a file that cannot be read is an error
that names the file, the key and what to do, before the service starts (and with
`sandtrace serve --check-config`, without starting it).
"""

from __future__ import annotations

import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.endpoints import is_loopback, read_token_file


class ConfigError(ValueError):
    """The configuration cannot be used; the message says where and why."""


@dataclass(slots=True)
class ServiceConfig:
    listen: str = "127.0.0.1:8780"
    token_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    insecure: bool = False
    state_dir: str = ""
    read_timeout: float = 30.0
    rules: list[str] = field(default_factory=list)
    builtin_rules: bool = True
    egress_allow: list[str] = field(default_factory=list)
    fold_seconds: float = 60.0
    tail: bool = True
    tail_queue: int = 10_000
    tail_clients: int = 64
    outputs: list[dict[str, Any]] = field(default_factory=list)
    fleet: dict[str, Any] = field(default_factory=dict)  # checked by service/fleetconfig.py
    source: str = "defaults"

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"server.listen: want HOST:PORT, not {self.listen!r}")
        return host.strip("[]"), int(port)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


_SECTIONS: dict[str, dict[str, tuple[str, type | tuple[type, ...]]]] = {
    # toml key -> (ServiceConfig attribute, accepted types)
    "server": {
        "listen": ("listen", str),
        "token_file": ("token_file", str),
        "tls_cert": ("tls_cert", str),
        "tls_key": ("tls_key", str),
        "insecure": ("insecure", bool),
        "state_dir": ("state_dir", str),
        "read_timeout": ("read_timeout", (int, float)),
    },
    "detection": {
        "rules": ("rules", list),
        "builtin_rules": ("builtin_rules", bool),
        "egress_allow": ("egress_allow", list),
        "fold_seconds": ("fold_seconds", (int, float)),
    },
    "tail": {
        "enabled": ("tail", bool),
        "queue": ("tail_queue", int),
        "clients": ("tail_clients", int),
    },
}


def load(path: Path) -> ServiceConfig:
    """The configuration in a TOML file, its keys checked (not yet its files: see check)."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    cfg = ServiceConfig(source=str(path))
    for section, value in data.items():
        if section == "output":
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"{path}: outputs are [[output]] tables")
            cfg.outputs = [dict(v) for v in value]
            continue
        if section == "fleet":  # `serve --nats`: its keys are checked by service/fleetconfig
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: fleet must be a table")
            cfg.fleet = dict(value)
            continue
        keys = _SECTIONS.get(section)
        if keys is None:
            known = ", ".join([*_SECTIONS, "output", "fleet"])
            raise ConfigError(f"{path}: unknown section [{section}] (known: {known})")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {section} must be a table")
        for key, item in value.items():
            if key not in keys:
                raise ConfigError(f"{path}: unknown key {section}.{key} (known: {', '.join(keys)})")
            attr, types = keys[key]
            if not isinstance(item, types) or (types is int and isinstance(item, bool)):
                raise ConfigError(
                    f"{path}: {section}.{key} has the wrong type ({type(item).__name__})"
                )
            if isinstance(item, list) and not all(isinstance(v, str) for v in item):
                raise ConfigError(f"{path}: {section}.{key} must be a list of strings")
            if attr == "read_timeout" and isinstance(item, int | float):
                setattr(cfg, attr, float(item))
            else:
                setattr(cfg, attr, item)
    return cfg


def read_token(cfg: ServiceConfig) -> str | None:
    if not cfg.token_file:
        return None
    try:
        return read_token_file(cfg.token_file)
    except ValueError as exc:
        raise ConfigError(f"server.token_file: {exc}") from None


def tls_context(cfg: ServiceConfig) -> ssl.SSLContext | None:
    if not cfg.tls_cert and not cfg.tls_key:
        return None
    if not cfg.tls_cert or not cfg.tls_key:
        raise ConfigError("server.tls_cert and server.tls_key go together: give both")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"server.tls_cert/tls_key: cannot load {cfg.tls_cert} with {cfg.tls_key}: {exc}"
        ) from None
    return ctx


def check(cfg: ServiceConfig) -> list[str]:
    """Everything that can be checked without starting: addresses, files, TLS material, the
    state directory. Returns notes for the operator; raises ConfigError on the first error."""
    notes: list[str] = []
    host, _port = cfg.host_port
    if cfg.read_timeout <= 0:
        raise ConfigError("server.read_timeout must be positive")
    if cfg.fold_seconds < 0:
        raise ConfigError("detection.fold_seconds must be 0 (every alert alone) or more")
    if cfg.tail_queue <= 0:
        raise ConfigError("tail.queue must be positive")
    if cfg.tail_clients <= 0:
        raise ConfigError("tail.clients must be positive")
    read_token(cfg)
    tls_context(cfg)
    if not cfg.tls and not is_loopback(host):
        if not cfg.insecure:
            raise ConfigError(
                f"server.listen: {host} is not loopback and there is no TLS: give tls_cert and "
                "tls_key, or insecure = true (--insecure) on a trusted network"
            )
        notes.append(f"listening in clear text on {host} (insecure = true)")
    if not cfg.token_file:
        notes.append("no token_file: any client that reaches the port may send and tail events")
    if cfg.state_dir:
        state = Path(cfg.state_dir)
        try:
            state.mkdir(parents=True, exist_ok=True, mode=0o700)
            probe = state / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"server.state_dir: {state} is not writable: {exc.strerror or exc}"
            ) from None
    else:
        notes.append("no state_dir: after a restart, a batch in flight may be handled twice")
    for r in cfg.rules:
        if not Path(r).exists():
            raise ConfigError(f"detection.rules: {r} does not exist")
    return notes
