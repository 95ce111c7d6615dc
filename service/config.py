"""The detection service's configuration: a TOML file, overridden by the command line.

    [server]
    listen = "0.0.0.0:8780"              # HOST:PORT
    token_file = "/etc/sandtrace/token"  # collectors and tail clients send this bearer token
    tls_cert = "/etc/sandtrace/service.pem"  # relative paths: beside this file
    tls_key = "/etc/sandtrace/service.key"
    insecure = false                     # allow plain HTTP on an address other than loopback
    state_dir = "/var/lib/sandtrace-service"  # each collector's last batch, across restarts
    read_timeout = 30.0                  # seconds a request body may take to arrive (else 408)

    [detection]
    rules = ["/etc/sandtrace/rules"]     # added to the built-in pack
    builtin_rules = true
    egress_allow = ["10.0.0.0/8", "sandbox-7=192.0.2.0/24:443", "192.0.2.9:8000-8100"]
    egress_check_loopback = false        # true: loopback connects are judged by the list too
    resolvers = ["192.0.2.53", "sandbox-7=198.51.100.53"]  # the only DNS servers sandboxes
                                         # may query (default: DNS is not judged apart)
    # egress_policy = "egress.toml"      # instead of the three above: a policy file
                                         # (README, "Egress policy"), re-read on SIGHUP
    allow_refused_rules = false          # true: a rule that cannot load is a warning, not an
                                         # error (it raises no alerts)
    fold_seconds = 60                    # repeats of a rule for one process within this
                                         # span are one alert with a count (0: each alone)

    [response]                           # orders sent back to the collector of the batch
    kill_on = "high"                     # kill the alerting process (and its descendants)
    freeze_on = "critical"               # freeze its whole sandbox; levels: informational,
                                         # low, medium, high, critical (default: neither)

    [tail]
    enabled = true
    queue = 10000                        # items held per tail client before it misses some
    clients = 64                         # tail clients at once; more get a 503

    [[output]]                           # any number; see service/outputs/config.py
    type = "jsonl"
    path = "/var/log/sandtrace/alerts.jsonl"
    what = "alerts"

A relative path in the file (token_file, tls_cert, tls_key, state_dir, rules; an output's
path, ca_file, token_file, api_key_file) is relative to the file's directory, not to the
working directory: the file and the secrets it names travel together, as in systemd's
credentials directory (deploy/sandtrace-service.service loads them all with LoadCredential=
and starts `sandtrace serve --config ${CREDENTIALS_DIRECTORY}/service.toml`).

Every key is checked: an unknown key, a wrong type or a file that cannot be read is an error
that names the file, the table, the key and what is expected, before the service starts (and
with `sandtrace serve --check-config`, without starting it). Every problem is reported at
once (ConfigError.problems), not the first only, so one edit can fix them all.
"""

from __future__ import annotations

import ssl
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.endpoints import is_loopback, read_token_file
from api.orders import LEVELS


class ConfigError(ValueError):
    """The configuration cannot be used: every problem found, each naming where (file,
    table, key; or the command-line option) and what is expected, then hints."""

    def __init__(self, problems: str | list[str], hints: list[str] | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.hints = list(hints or [])
        super().__init__(self.report())

    def report(self) -> str:
        """One problem on one line; several as a count, then one indented line each."""
        if len(self.problems) == 1:
            lines = [self.problems[0]]
        else:
            lines = [f"{len(self.problems)} problems:", *(f"  {p}" for p in self.problems)]
        return "\n".join([*lines, *self.hints])


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
    allow_refused_rules: bool = False
    egress_allow: list[str] = field(default_factory=list)
    egress_check_loopback: bool = False
    resolvers: list[str] = field(default_factory=list)
    egress_policy: str = ""
    fold_seconds: float = 60.0
    kill_on: str = ""  # "" or a level: api.orders.LEVELS
    freeze_on: str = ""
    tail: bool = True
    tail_queue: int = 10_000
    tail_clients: int = 64
    outputs: list[dict[str, Any]] = field(default_factory=list)
    fleet: dict[str, Any] = field(default_factory=dict)  # checked by service/fleetconfig.py
    source: str = "defaults"
    # where each setting came from, for messages: attribute -> "FILE: [table] key" or
    # "--option"; output_origins: one "FILE: [[output]] #N" or "--alerts" per output
    origins: dict[str, str] = field(default_factory=dict)
    output_origins: list[str] = field(default_factory=list)

    def where(self, attr: str) -> str:
        """Where a setting was given: the file, table and key, or the option."""
        if attr in self.origins:
            return self.origins[attr]
        section, key = _KEY_OF[attr]
        return f"[{section}] {key}"

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"{self.where('listen')}: {self.listen!r}: expected HOST:PORT with a port "
                "1-65535, e.g. 0.0.0.0:8780"
            )
        return host.strip("[]"), int(port)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


_KeyType = type | tuple[type, ...]
_NUMBER = (int, float)
_SECTIONS: dict[str, dict[str, tuple[str, _KeyType, str]]] = {
    # toml key -> (ServiceConfig attribute, accepted types, what is expected)
    "server": {
        "listen": ("listen", str, "a string HOST:PORT"),
        "token_file": ("token_file", str, "a string: the token file's path"),
        "tls_cert": ("tls_cert", str, "a string: the certificate's path"),
        "tls_key": ("tls_key", str, "a string: the private key's path"),
        "insecure": ("insecure", bool, "true or false"),
        "state_dir": ("state_dir", str, "a string: a directory's path"),
        "read_timeout": ("read_timeout", _NUMBER, "a number of seconds"),
    },
    "detection": {
        "rules": ("rules", list, "a list of strings: rule directories or files"),
        "builtin_rules": ("builtin_rules", bool, "true or false"),
        "allow_refused_rules": ("allow_refused_rules", bool, "true or false"),
        "egress_allow": ("egress_allow", list, "a list of strings: allow-list entries"),
        "egress_check_loopback": ("egress_check_loopback", bool, "true or false"),
        "resolvers": ("resolvers", list, "a list of strings: DNS servers' addresses"),
        "egress_policy": ("egress_policy", str, "a string: an egress policy file's path"),
        "fold_seconds": ("fold_seconds", _NUMBER, "a number of seconds"),
    },
    "response": {
        "kill_on": ("kill_on", str, "a level: informational, low, medium, high or critical"),
        "freeze_on": ("freeze_on", str, "a level: informational, low, medium, high or critical"),
    },
    "tail": {
        "enabled": ("tail", bool, "true or false"),
        "queue": ("tail_queue", int, "an integer"),
        "clients": ("tail_clients", int, "an integer"),
    },
}
_KEY_OF = {
    attr: (section, key)
    for section, keys in _SECTIONS.items()
    for key, (attr, _t, _e) in keys.items()
}
_TOML_TYPES = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    list: "an array",
    dict: "a table",
}


def toml_type(value: object) -> str:
    """What a TOML value is, in TOML's words (for 'is X, expected Y' messages)."""
    return _TOML_TYPES.get(type(value), type(value).__name__)


def has_type(value: object, want: _KeyType) -> bool:
    """isinstance, except that true and false are not numbers."""
    if isinstance(value, bool):
        return want is bool or (isinstance(want, tuple) and bool in want)
    return isinstance(value, want)


def read(path: Path) -> tuple[ServiceConfig, list[str]]:
    """The configuration in a TOML file and every problem with its keys (a key with a
    problem keeps its default). ConfigError when the file cannot be read or is not TOML."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    cfg = ServiceConfig(source=str(path))
    problems: list[str] = []
    known = ", ".join([*(f"[{s}]" for s in _SECTIONS), "[fleet]", "[[output]]"])
    for section, value in data.items():
        if section == "output":
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                problems.append(
                    f"{path}: [output]: is {toml_type(value)}; expected [[output]] tables "
                    "(an array of tables: [[output]] on each, two brackets)"
                )
                continue
            cfg.outputs = [_beside(path, dict(v), _OUTPUT_PATHS) for v in value]
            cfg.output_origins = [f"{path}: [[output]] #{i}" for i in range(1, len(value) + 1)]
            continue
        if section == "fleet":  # `serve --nats`: its keys are checked by service/fleetconfig
            if not isinstance(value, dict):
                problems.append(f"{path}: fleet: is {toml_type(value)}; expected a table [fleet]")
            else:
                cfg.fleet = dict(value)
            continue
        keys = _SECTIONS.get(section)
        if keys is None:
            problems.append(f"{path}: [{section}]: unknown table (expected one of {known})")
            continue
        if not isinstance(value, dict):
            problems.append(
                f"{path}: {section}: is {toml_type(value)}; expected a table [{section}]"
            )
            continue
        for key, item in value.items():
            where = f"{path}: [{section}] {key}"
            if key not in keys:
                problems.append(f"{where}: unknown key (expected one of {', '.join(keys)})")
                continue
            attr, types, expected = keys[key]
            if not has_type(item, types) or (
                isinstance(item, list) and not all(isinstance(v, str) for v in item)
            ):
                what = toml_type(item)
                if isinstance(item, list):
                    what = "an array with " + ", ".join(
                        sorted({toml_type(v) for v in item if not isinstance(v, str)})
                    )
                problems.append(f"{where}: {item!r} is {what}; expected {expected}")
                continue
            if attr in _PATHS and isinstance(item, list):
                setattr(cfg, attr, [_beside_one(path, v) for v in item])
            elif attr in _PATHS:
                setattr(cfg, attr, _beside_one(path, item))
            elif attr in ("kill_on", "freeze_on") and item not in LEVELS:
                problems.append(f"{where}: {item!r} is not a level; expected {expected}")
                continue
            else:
                setattr(cfg, attr, item)
            cfg.origins[attr] = where
    return cfg, problems


_PATHS = {"token_file", "tls_cert", "tls_key", "state_dir", "rules", "egress_policy"}
_OUTPUT_PATHS = {"path", "ca_file", "token_file", "api_key_file"}


def _beside_one(config: Path, value: str) -> str:
    """A path from the file: relative ones are relative to the file's directory ("-", the
    standard output, and "" stay as they are)."""
    if value in ("", "-") or Path(value).is_absolute():
        return value
    return str(config.parent / value)


def _beside(config: Path, section: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {
        k: _beside_one(config, v) if k in keys and isinstance(v, str) else v
        for k, v in section.items()
    }


def load(path: Path) -> ServiceConfig:
    """The configuration in a TOML file, its keys checked (not yet its files: see check).
    ConfigError lists every problem."""
    cfg, problems = read(path)
    if problems:
        raise ConfigError(problems)
    return cfg


def read_token(cfg: ServiceConfig) -> str | None:
    if not cfg.token_file:
        return None
    try:
        return read_token_file(cfg.token_file)
    except ValueError as exc:
        raise ConfigError(
            f"{cfg.where('token_file')}: {exc} (expected a readable file holding the token)"
        ) from None


def tls_context(cfg: ServiceConfig) -> ssl.SSLContext | None:
    if not cfg.tls_cert and not cfg.tls_key:
        return None
    if not cfg.tls_cert or not cfg.tls_key:
        given, missing = ("tls_cert", "tls_key") if cfg.tls_cert else ("tls_key", "tls_cert")
        raise ConfigError(
            f"{cfg.where(given)}: given without {missing}: tls_cert and tls_key go together "
            "(expected both, or neither for plain HTTP)"
        )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{cfg.where('tls_cert')}: cannot load {cfg.tls_cert} with the key {cfg.tls_key}: "
            f"{exc} (expected a PEM certificate chain and its PEM private key)"
        ) from None
    return ctx


def check(cfg: ServiceConfig) -> list[str]:
    """Everything about the settings that can be checked without starting: addresses,
    files, TLS material, the state directory. Returns notes for the operator; raises
    ConfigError listing every problem."""
    notes: list[str] = []
    problems: list[str] = []

    def attempt(step: Callable[[ServiceConfig], object]) -> object:
        try:
            return step(cfg)
        except ConfigError as exc:
            problems.extend(exc.problems)
            return None

    host_port = attempt(lambda c: c.host_port)
    for attr, ok, expected in (
        ("read_timeout", cfg.read_timeout > 0, "a positive number of seconds"),
        ("fold_seconds", cfg.fold_seconds >= 0, "0 (every alert alone) or more seconds"),
        ("tail_queue", cfg.tail_queue > 0, "a positive integer"),
        ("tail_clients", cfg.tail_clients > 0, "a positive integer"),
    ):
        if not ok:
            problems.append(f"{cfg.where(attr)}: {getattr(cfg, attr)!r}: expected {expected}")
    attempt(read_token)
    attempt(tls_context)
    if isinstance(host_port, tuple) and not cfg.tls and not is_loopback(host_port[0]):
        host = host_port[0]
        if not cfg.insecure:
            problems.append(
                f"{cfg.where('listen')}: {host} is not loopback and there is no TLS: expected "
                "tls_cert and tls_key, or insecure = true (--insecure) on a trusted network"
            )
        else:
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
            problems.append(
                f"{cfg.where('state_dir')}: {state} is not writable: {exc.strerror or exc} "
                "(expected a directory the service may write, or one it may create)"
            )
    else:
        notes.append("no state_dir: after a restart, a batch in flight may be handled twice")
    for r in cfg.rules:
        if not Path(r).exists():
            problems.append(
                f"{cfg.where('rules')}: {r} does not exist (expected a directory of Sigma "
                "rules or a rule file)"
            )
    if problems:
        raise ConfigError(problems)
    return notes
