"""Response: kill an alerting process and its descendants, or freeze its whole sandbox.

A Responder is one more sink of the pipeline. Each alert at or above --kill-on /
--freeze-on (api.orders.orders_for), and each order the detection service sends back for
a batch (collector.stream), becomes an action on the sandbox the alert came from, and every
action becomes a ResponseEvent (what, why, when, result) that goes to every sink.

What keeps an action inside the sandboxes this collector traces, whatever an alert or an
order says (an alert's fields come from what traced processes did):

- the order's sandbox must be one this collector traces (by its id), never the host;
- kill: the process is opened as a pidfd first, then checked: its start time must be the
  alert's (so a pid reused since is never signalled) and its cgroup must lie inside the
  sandbox (a process that moved out is not touched); every signal then goes through the
  pidfd, which cannot come to name another process. Its descendants are stopped (SIGSTOP,
  so none forks meanwhile) round after round until no new one turns up, each checked the
  same way, and then all are killed (SIGKILL). This collector and its ancestors are never
  signalled.
- freeze: ``cgroup.freeze`` of the sandbox's own cgroups (never the root), then
  ``cgroup.events`` watched until it says ``frozen 1``. A process in uninterruptible sleep
  (state D) freezes only once its system call ends: the freeze then reports "failed" after
  the timeout, and the kernel completes it later.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from api.events import Alert, AnyEvent, Process, ResponseEvent
from api.orders import Order, level_at_least, orders_for
from collector import cgroups
from collector.proctable import NS_PER_SEC, descendants, parse_stat

log = structlog.get_logger("sandtrace.response")

FREEZE_TIMEOUT = 5.0
_STOP_ROUNDS = 16  # rounds of "stop the descendants found": a fork bomb outruns none for long


def _clock_tick_ns() -> int:
    return NS_PER_SEC // os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class TracedSandbox:
    """A sandbox this collector traces: its cgroup directories, or the process whose
    descendants it is (watch --pid)."""

    cgroup_dirs: list[Path] = field(default_factory=list)  # absolute
    root_pid: int = 0


class _Refused(Exception):
    """The target is not one this collector may touch (result "refused")."""


class _Gone(Exception):
    """The process exited, or its pid now names another process (result "gone")."""


def _rel(path: Path, root: Path) -> str:
    return "/" + str(path.relative_to(root)) if path != root else "/"


def _cgroup_id(path: Path) -> int:
    try:
        return path.stat().st_ino
    except OSError:
        return 0


def start_matches(pid: int, start_ns: int, tick_ns: int = 0) -> bool:
    """Whether the process now at `pid` started when the alert's did (`start_ns`, the
    kernel's CLOCK_MONOTONIC start time, or a clock tick's /proc reading of it). /proc's
    start time is boot-relative and counted in ticks: it may lie up to the time the host
    spent suspended after the monotonic one, and a tick either side."""
    tick_ns = tick_ns or _clock_tick_ns()
    try:
        _, _, ticks = parse_stat(Path(f"/proc/{pid}/stat").read_bytes())
    except (OSError, ValueError):
        return False
    suspended = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
    diff = ticks * tick_ns - start_ns
    return -2 * tick_ns <= diff <= max(suspended, 0) + 2 * tick_ns


def _protected() -> set[int]:
    """This process and its ancestors: never signalled, whatever an order says."""
    out = {os.getpid()}
    pid = os.getppid()
    while pid > 0 and pid not in out:
        out.add(pid)
        try:
            _, pid, _ = parse_stat(Path(f"/proc/{pid}/stat").read_bytes())
        except (OSError, ValueError):
            break
    return out


class Responder:
    """The actions of alerts and of the service's orders, each reported as a ResponseEvent
    handed to `out` (the pipeline's emit, set once the pipeline exists)."""

    def __init__(
        self,
        sandboxes: Mapping[str, TracedSandbox],
        cgroup_root: Path,
        *,
        host: str,
        kill_on: str | None = None,
        freeze_on: str | None = None,
        say: Callable[[str], None] | None = None,
        freeze_timeout: float = FREEZE_TIMEOUT,
        embedded: bool = True,
    ) -> None:
        """kill_on and freeze_on: the levels from which this collector's own alerts order
        an action (`embedded`), or, streaming to a service (not `embedded`), from which it
        takes the service's orders."""
        self.embedded = embedded
        self.sandboxes = dict(sandboxes)
        self.root = cgroup_root
        self.host = host
        self.kill_on = kill_on
        self.freeze_on = freeze_on
        self.say = say or (lambda _m: None)
        self.freeze_timeout = freeze_timeout
        self.out: Callable[[AnyEvent], None] | None = None
        self._killed: set[str] = set()  # process keys already killed
        self._frozen: set[str] = set()  # sandboxes frozen (until the collector ends)
        self._tasks: set[asyncio.Task[None]] = set()
        self._protected = _protected()

    # -- the Sink protocol: alerts of the embedded engine -------------------------------------

    def emit(self, item: AnyEvent | Alert) -> None:
        if self.embedded and isinstance(item, Alert) and (self.kill_on or self.freeze_on):
            for order in orders_for(item, self.kill_on, self.freeze_on, now_ns=time.time_ns()):
                self.execute(order, "embedded")

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None

    async def aclose(self) -> None:
        """Freezes still being waited for finish (and are reported) first."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- actions --------------------------------------------------------------------------------

    def execute(self, order: Order, origin: str) -> None:
        """Act on an order (the service's, or made of an alert here). A kill is done at once
        (a few system calls and a /proc scan: the sooner the better); a freeze waits for the
        kernel in a task. Either way the ResponseEvent follows the alert in every output."""
        began = time.monotonic_ns()
        if order.action == "kill":
            if order.process.key in self._killed:
                log.debug("already killed", key=order.process.key, alert=order.alert_id)
                return
            event = self._kill(order, origin, began)
            if event.result == "ok":
                self._killed.add(order.process.key)
            self._report(event)
        elif order.action == "freeze":
            if order.sandbox in self._frozen:
                log.debug("already frozen", sandbox=order.sandbox, alert=order.alert_id)
                return
            self._frozen.add(order.sandbox)
            task = asyncio.get_running_loop().create_task(self._freeze(order, origin, began))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            log.warning("unknown response action", action=order.action, alert=order.alert_id)

    def order_from_service(self, order: Order) -> None:
        """An order the service sent back: carried out when this collector was started to
        take it (--kill-on/--freeze-on at or below the alert's level), else refused; either
        way reported."""
        threshold = self.kill_on if order.action == "kill" else self.freeze_on
        if threshold is not None and level_at_least(order.level, threshold):
            self.execute(order, "service")
            return
        option = "--kill-on" if order.action == "kill" else "--freeze-on"
        why = (
            f"this collector takes {order.action} orders only with {option}"
            if threshold is None
            else f"this collector takes {order.action} orders from {option} {threshold} up"
        )
        self._report(
            self._event(
                order, "service", time.monotonic_ns(), cgroup="", result="refused", error=why
            )
        )

    def _report(self, event: ResponseEvent) -> None:
        """The event goes out after the alert that ordered it has reached every sink."""
        if event.result != "ok":
            log.warning(
                "response failed",
                action=event.action,
                sandbox=event.sandbox,
                pid=event.target_pid,
                result=event.result,
                error=event.error,
            )
        if self.out is not None:
            asyncio.get_running_loop().call_soon(self.out, event)

    def _event(
        self, order: Order, origin: str, began: int, *, cgroup: str, result: str, error: str = ""
    ) -> ResponseEvent:
        now = time.monotonic_ns()
        return ResponseEvent(
            time_ns=time.time_ns(),
            mono_ns=now,
            host=self.host,
            sandbox=order.sandbox,
            cgroup_id=_cgroup_id(self.root / cgroup.lstrip("/")) if cgroup else 0,
            cgroup_path=cgroup,
            container_id=cgroups.container_id_from_path(cgroup) if cgroup else "",
            process=order.process,
            action=order.action,
            origin=origin,
            result=result,
            error=error,
            alert_id=order.alert_id,
            rule_id=order.rule_id,
            title=order.title,
            level=order.level,
            target_pid=order.process.pid if order.action == "kill" else 0,
            target_key=order.process.key if order.action == "kill" else "",
            took_ns=now - began,
        )

    # -- kill ------------------------------------------------------------------------------------

    def _inside(self, sandbox: TracedSandbox, pid: int) -> str:
        """The cgroup of `pid` when it lies inside `sandbox`; _Refused when it does not,
        _Gone when it has exited."""
        if pid in self._protected:
            raise _Refused(f"pid {pid} is this collector or one of its ancestors")
        try:
            cgroup = cgroups.cgroup_of(pid)
        except (FileNotFoundError, ProcessLookupError):
            raise _Gone(f"pid {pid} exited") from None
        except OSError as exc:
            raise _Refused(f"cannot read the cgroup of pid {pid}: {exc}") from None
        for directory in sandbox.cgroup_dirs:
            rel = _rel(directory, self.root)
            if rel != "/" and (cgroup == rel or cgroup.startswith(rel + "/")):
                return cgroup
        if sandbox.root_pid and pid in descendants(sandbox.root_pid):
            return cgroup
        raise _Refused(f"pid {pid} is not inside the sandbox (cgroup {cgroup})")

    def _the_alerts(self, sandbox: TracedSandbox, pid: int, start_ns: int) -> str:
        """The cgroup of `pid` when it is still the alert's process (_Gone when its pid
        names another now) and inside `sandbox` (_Refused when not)."""
        if not start_matches(pid, start_ns):
            raise _Gone(f"pid {pid} now names another process (its start time differs)")
        return self._inside(sandbox, pid)

    def _kill(self, order: Order, origin: str, began: int) -> ResponseEvent:
        sandbox = self.sandboxes.get(order.sandbox)
        pid = order.process.pid
        if sandbox is None:
            return self._event(
                order,
                origin,
                began,
                cgroup="",
                result="refused",
                error=f"{order.sandbox!r} is not a sandbox this collector traces",
            )
        fds: dict[int, int] = {}
        cgroup = ""
        try:
            try:
                fds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                raise _Gone(f"pid {pid} exited") from None
            # The pidfd names this process for good; now check that it is the alert's.
            cgroup = self._the_alerts(sandbox, pid, order.process.start_ns)
            signal.pidfd_send_signal(fds[pid], signal.SIGSTOP)
            for _ in range(_STOP_ROUNDS):
                found = descendants(pid) - fds.keys()
                if not found:
                    break
                for child in sorted(found):
                    try:
                        fd = os.pidfd_open(child)
                    except ProcessLookupError:
                        continue
                    try:
                        self._inside(sandbox, child)
                        signal.pidfd_send_signal(fd, signal.SIGSTOP)
                    except (_Refused, _Gone, ProcessLookupError):
                        os.close(fd)  # a descendant outside the sandbox is not touched
                        continue
                    fds[child] = fd
            for fd in fds.values():
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
        except _Gone as exc:
            return self._event(order, origin, began, cgroup=cgroup, result="gone", error=str(exc))
        except _Refused as exc:
            return self._event(
                order, origin, began, cgroup=cgroup, result="refused", error=str(exc)
            )
        except OSError as exc:
            return self._event(
                order, origin, began, cgroup=cgroup, result="failed", error=f"signal: {exc}"
            )
        finally:
            for fd in fds.values():
                os.close(fd)
        event = self._event(order, origin, began, cgroup=cgroup, result="ok")
        event.pids = sorted(fds)
        return event

    # -- freeze ----------------------------------------------------------------------------------

    async def _freeze(self, order: Order, origin: str, began: int) -> None:
        sandbox = self.sandboxes.get(order.sandbox)
        if sandbox is None or not sandbox.cgroup_dirs:
            why = (
                "has no cgroup of its own to freeze (traced by --pid)"
                if sandbox is not None
                else "is not a sandbox this collector traces"
            )
            self._frozen.discard(order.sandbox)
            self._report(
                self._event(
                    order,
                    origin,
                    began,
                    cgroup="",
                    result="refused",
                    error=f"{order.sandbox!r} {why}",
                )
            )
            return
        cgroup = _rel(sandbox.cgroup_dirs[0], self.root)
        error = await asyncio.to_thread(set_frozen, sandbox.cgroup_dirs, True, self.freeze_timeout)
        event = self._event(
            order, origin, began, cgroup=cgroup, result="failed" if error else "ok", error=error
        )
        self._report(event)
        if not error:
            self.say(
                f"froze sandbox {order.sandbox} (cgroup {cgroup}) after alert {order.alert_id} "
                f"[{order.level}] {order.title}; end the freeze with: sandtrace sandbox thaw "
                f"{cgroup}, or end the sandbox with: sandtrace sandbox kill {cgroup}"
            )


def _events_value(directory: Path, key: str) -> str:
    try:
        text = (directory / "cgroup.events").read_text(encoding="ascii")
    except OSError:
        return ""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return value.strip()
    return ""


def set_frozen(dirs: Sequence[Path], frozen: bool, timeout: float = FREEZE_TIMEOUT) -> str:
    """Freeze (or thaw) each cgroup and wait until cgroup.events says so; "" when done,
    else what went wrong."""
    want = "1" if frozen else "0"
    for directory in dirs:
        if not (directory / "cgroup.freeze").exists():
            return f"{directory} has no cgroup.freeze (the root cgroup, or a kernel before 5.2)"
        try:
            (directory / "cgroup.freeze").write_text(want, encoding="ascii")
        except OSError as exc:
            return f"cannot write {directory}/cgroup.freeze: {exc.strerror or exc}"
    deadline = time.monotonic() + timeout
    while True:
        left = [d for d in dirs if _events_value(d, "frozen") != want]
        if not left:
            return ""
        if time.monotonic() >= deadline:
            state = "frozen" if frozen else "thawed"
            return (
                f"{left[0]} not {state} within {timeout:g} s (a process in uninterruptible "
                "sleep freezes only once its system call ends; the kernel completes it later)"
            )
        time.sleep(0.002)


def kill_cgroup(directory: Path, timeout: float = FREEZE_TIMEOUT) -> tuple[list[int], str]:
    """Kill every process in a cgroup subtree (cgroup.kill where the kernel has it, else
    freeze and SIGKILL each), and wait until it is empty: (the pids killed, "" or what went
    wrong)."""
    pids = sorted(cgroups.pids_in_subtree(directory))
    kill_file = directory / "cgroup.kill"
    try:
        if kill_file.exists():
            kill_file.write_text("1", encoding="ascii")
        else:
            with contextlib.suppress(OSError):
                (directory / "cgroup.freeze").write_text("1", encoding="ascii")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    except OSError as exc:
        return pids, f"cannot kill the processes of {directory}: {exc.strerror or exc}"
    deadline = time.monotonic() + timeout
    while _events_value(directory, "populated") not in ("0", ""):
        if time.monotonic() >= deadline:
            left = sorted(cgroups.pids_in_subtree(directory))
            return pids, f"processes left after {timeout:g} s: {left} (in uninterruptible sleep?)"
        time.sleep(0.005)
    if not kill_file.exists():  # a frozen cgroup left frozen would freeze what joins it next
        with contextlib.suppress(OSError):
            (directory / "cgroup.freeze").write_text("0", encoding="ascii")
    return pids, ""


# --- sandtrace sandbox freeze|thaw|kill NAME ---------------------------------------------------


def sandbox_dir(spec: str, root: Path) -> Path:
    """The cgroup directory NAME names: a sandbox id as `run` prints it (st-1a2b3c4d), its
    path under the cgroup root (/sandtrace/st-1a2b3c4d), its directory, or its cgroup id;
    never the root itself. ValueError says why not."""
    path = cgroups.named_cgroup(spec, root, sandbox_ids=True)
    if path is not None:
        return path
    raise ValueError(
        f"no sandbox cgroup {spec!r} under {root} (give the sandbox id as sandtrace printed "
        "it, e.g. st-1a2b3c4d, its cgroup path such as /sandtrace/st-1a2b3c4d, its "
        "directory, or its cgroup id; the root cgroup is not a sandbox)"
    )


def _self_process() -> Process:
    """sandtrace's own process, the actor of an operator's command."""
    pid = os.getpid()
    try:
        _, _, ticks = parse_stat(Path(f"/proc/{pid}/stat").read_bytes())
    except (OSError, ValueError):
        ticks = 0
    start_ns = ticks * _clock_tick_ns()
    return Process(
        pid=pid,
        tid=pid,
        ns_pid=pid,
        ppid=os.getppid(),
        uid=os.getuid(),
        gid=os.getgid(),
        comm=b"sandtrace",
        start_ns=start_ns,
        key=f"{pid}@{start_ns}",
        exe=os.fsencode(sys.executable),
        argv=[os.fsencode(a) for a in sys.argv],
    )


def operator_action(action: str, spec: str, root: Path, timeout: float) -> ResponseEvent:
    """`sandtrace sandbox ACTION NAME`, as a ResponseEvent; ValueError for a NAME that
    names no sandbox."""
    directory = sandbox_dir(spec, root)
    began = time.monotonic_ns()
    pids: list[int] = []
    if action == "kill":
        pids, error = kill_cgroup(directory, timeout)
    else:
        error = set_frozen([directory], action == "freeze", timeout)
    rel = _rel(directory, root)
    now = time.monotonic_ns()
    return ResponseEvent(
        time_ns=time.time_ns(),
        mono_ns=now,
        host=os.uname().nodename,
        sandbox=directory.name if directory.parent.name == "sandtrace" else rel,
        cgroup_id=_cgroup_id(directory),
        cgroup_path=rel,
        container_id=cgroups.container_id_from_path(rel),
        process=_self_process(),
        action=action,
        origin="operator",
        result="failed" if error else "ok",
        error=error,
        pids=pids,
        took_ns=now - began,
    )


def sandbox_main(action: str, spec: str, *, as_json: bool, timeout: float) -> int:
    """The `sandtrace sandbox` command: 0 when done, 1 when the kernel did not, 2 for a
    NAME that names no sandbox."""
    from api.render import json_line  # noqa: PLC0415

    try:
        root = cgroups.find_cgroup2_root()
        event = operator_action(action, spec, root, timeout)
    except (ValueError, cgroups.CgroupError) as exc:
        print(f"sandtrace: sandbox {action}: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json_line(event), flush=True)
    done = {"freeze": "froze", "thaw": "thawed", "kill": "killed"}[action]
    if event.result == "ok":
        what = f" ({len(event.pids)} processes)" if action == "kill" else ""
        print(f"sandtrace: {done} sandbox {event.cgroup_path}{what}", file=sys.stderr)
        return 0
    print(f"sandtrace: sandbox {action} {event.cgroup_path}: {event.error}", file=sys.stderr)
    return 1
