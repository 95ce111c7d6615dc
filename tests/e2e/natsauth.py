"""NATS identities for tests, made with the `nkeys` package (nats-py[nkeys]) alone: user
NKey seeds for `authorization { users = [{nkey: ...}] }`, and a decentralised setup (an
operator, an account with JetStream, a user) whose user credentials file is what `nsc`
writes: the user's JWT and its seed. The JWTs are made here as nats-io/jwt v2 encodes them
(a JSON header and claims, base64url without padding, signed with the issuer's ed25519
NKey), so the test needs no `nsc`."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@dataclass
class Identity:
    seed: bytes
    public: str

    def write_seed(self, path: Path) -> Path:
        path.write_bytes(self.seed + b"\n")
        path.chmod(0o600)
        return path


def identity(prefix: int) -> Identity:
    """A new NKey of the kind `prefix` says (nkeys.PREFIX_BYTE_USER, _ACCOUNT, _OPERATOR)."""
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return Identity(seed, nkeys.from_seed(seed).public_key.decode())


def user() -> Identity:
    return identity(nkeys.PREFIX_BYTE_USER)


def jwt(issuer: Identity, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A JWT with `nats` claims about `subject`, signed by `issuer`."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public,
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    digest = hashlib.sha512(json.dumps(claims, sort_keys=True).encode()).digest()[:32]
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    payload = _b64(json.dumps(claims).encode())
    signature = nkeys.from_seed(issuer.seed).sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_b64(signature)}"


@dataclass
class Decentralised:
    """An operator and one account (JetStream unlimited); server_config() for nats-server,
    creds() for each user of the account."""

    operator: Identity
    account: Identity
    system: Identity

    def server_config(self) -> str:
        operator = jwt(
            self.operator,
            self.operator.public,
            "sandtrace-test-operator",
            {"type": "operator", "system_account": self.system.public},
        )
        unlimited = {
            "subs": -1,
            "data": -1,
            "payload": -1,
            "imports": -1,
            "exports": -1,
            "wildcards": True,
            "conn": -1,
            "leaf": -1,
        }
        jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
        account = jwt(
            self.operator,
            self.account.public,
            "sandtrace",
            {"type": "account", "limits": {**unlimited, **jetstream}},
        )
        system = jwt(
            self.operator, self.system.public, "SYS", {"type": "account", "limits": unlimited}
        )
        return (
            f"operator: {operator}\n"
            f"system_account: {self.system.public}\n"
            "resolver: MEMORY\n"
            f"resolver_preload: {{\n  {self.account.public}: {account}\n"
            f"  {self.system.public}: {system}\n}}\n"
        )

    def creds(self, path: Path, who: Identity | None = None) -> Path:
        """A credentials file for a user of the account (a new one unless `who`)."""
        member = who or user()
        token = jwt(
            self.account,
            member.public,
            path.stem,
            {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
        )
        path.write_text(
            "-----BEGIN NATS USER JWT-----\n"
            f"{token}\n"
            "------END NATS USER JWT------\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{member.seed.decode()}\n"
            "------END USER NKEY SEED------\n"
        )
        path.chmod(0o600)
        return path


def decentralised() -> Decentralised:
    return Decentralised(
        identity(nkeys.PREFIX_BYTE_OPERATOR),
        identity(nkeys.PREFIX_BYTE_ACCOUNT),
        identity(nkeys.PREFIX_BYTE_ACCOUNT),
    )
