"""The egress policy of `run` and `watch`: built from the options or a policy file, the DNS
servers of resolv.conf filled in where it names none, re-read on SIGHUP.

The policies in use are never changed in place: a reload builds new ones and swaps them into
the engine in one assignment, on the event loop's thread, between two events (no event is
held or dropped for it). Whoever else acts on the policy (in-kernel enforcement) subscribes
with `on_policy_change` and is called with the new policies after each swap.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from pathlib import Path

import structlog

from detect.egress import EgressPolicies, Resolver, parse_resolver
from detect.policyfile import PolicyFileError, read_policy_file

log = structlog.get_logger("sandtrace")

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
_NO_NAMESERVER = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))
"""What the resolver library queries when resolv.conf names no nameserver (resolv.conf(5))."""


def nameservers(text: str) -> list[Resolver]:
    """The `nameserver` addresses of a resolv.conf, in order, duplicates once; lines that
    name no address (a scoped fe80::1%eth0 keeps its address) are skipped, as the resolver
    library skips them."""
    found: list[Resolver] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            addr = parse_resolver(words[1].partition("%")[0])
        except ValueError:
            continue
        if addr not in found:
            found.append(addr)
    return found


def host_resolvers(path: Path = HOST_RESOLV_CONF) -> tuple[Resolver, ...]:
    """The nameservers of the host's resolv.conf (those the library uses without one)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    return tuple(nameservers(text)) or _NO_NAMESERVER


PolicyCallback = Callable[[EgressPolicies], None]


class EgressPolicySource:
    """The policies of one collector and where they come from: fixed (options), or a file
    re-read by `reload`. Policies without resolvers of their own get the host's."""

    def __init__(
        self,
        policies: EgressPolicies,
        path: Path | None = None,
        resolv_conf: Path = HOST_RESOLV_CONF,
    ) -> None:
        self.path = path
        self.resolv_conf = resolv_conf
        self.host_resolvers = host_resolvers(resolv_conf)
        self.took_host_resolvers = False  # some policy named no resolvers: took the host's
        self.policies = self._filled(policies)
        self._subscribers: list[PolicyCallback] = []
        self._reloading = asyncio.Lock()

    @classmethod
    def from_file(cls, path: Path, resolv_conf: Path = HOST_RESOLV_CONF) -> EgressPolicySource:
        """The policies of a policy file; PolicyFileError lists every problem."""
        return cls(read_policy_file(path), path, resolv_conf)

    def _filled(self, policies: EgressPolicies) -> EgressPolicies:
        self.took_host_resolvers = any(not p.resolvers for p in policies.policies())
        return policies.with_default_resolvers(self.host_resolvers)

    def describe(self) -> str:
        """What the startup line says about the policy."""
        what = f"egress policy {self.path}" if self.path else "egress allow-list"
        text = f"{what} of {len(self.policies)}"
        if self.took_host_resolvers:
            servers = ", ".join(map(str, self.host_resolvers))
            where = "in the file's resolvers" if self.path else "with --resolver"
            text += (
                f", resolvers {servers} from the host's {self.resolv_conf} (a sandbox in a "
                f"mount namespace of its own may have others: name them {where})"
            )
        return text

    def on_policy_change(self, callback: PolicyCallback) -> None:
        """Call `callback` with the new policies (resolvers filled in) after every reload,
        in the order subscribed, on the event loop's thread: the hook for whatever else
        holds sandboxes to the policy."""
        self._subscribers.append(callback)

    async def reload(self) -> list[str]:
        """Re-read the file and the host's resolv.conf (in a worker thread): the new
        policies in use, every subscriber told; or, when the file has problems, the old
        policies kept and the problems returned for the caller to say. Reloads one at a
        time, in the order asked."""
        path = self.path
        if path is None:
            return []

        def read() -> tuple[EgressPolicies, tuple[Resolver, ...]]:
            return read_policy_file(path), host_resolvers(self.resolv_conf)

        async with self._reloading:
            try:
                policies, resolvers = await asyncio.to_thread(read)
            except PolicyFileError as exc:
                log.debug("egress policy not reloaded", path=str(path))
                return exc.problems
            self.host_resolvers = resolvers
            self.apply(policies)
            log.info("egress policy reloaded", path=str(path), entries=len(policies))
            return []

    def apply(self, policies: EgressPolicies) -> None:
        """Use `policies` (resolvers filled in) from now on and tell every subscriber."""
        self.policies = self._filled(policies)
        for callback in self._subscribers:
            callback(self.policies)
