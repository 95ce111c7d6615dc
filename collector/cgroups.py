"""cgroup v2 helpers: find the hierarchy, name cgroup ids, make and tear down sandboxes.

A cgroup v2 id (what ``bpf_get_current_cgroup_id()`` returns) is the inode number of the
cgroup's directory in the cgroup2 file system, so ids are resolved to paths by walking
that tree. Paths are reported relative to the cgroup2 root and start with "/", the way
``/proc/PID/cgroup`` shows them ("/sandtrace/st-1a2b3c4d").

The cgroup2 mount point differs between hosts (``/sys/fs/cgroup`` on unified systems,
``/sys/fs/cgroup/unified`` on hybrid ones): always find it with `find_cgroup2_root`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

_log = structlog.get_logger()

MOUNT_HINT = "mount it with: mount -t cgroup2 none /sys/fs/cgroup"
_KILL_FILE = "cgroup.kill"  # kills a whole subtree at once (kernel 5.14+)


class CgroupError(Exception):
    """A cgroup operation failed; the message says what to do about it."""


# --- finding the hierarchy -----------------------------------------------------------


def _unescape_mount_field(field: str) -> str:
    r"""Undo the octal escapes (\040 for a space, ...) the kernel puts in mountinfo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def find_cgroup2_root(mountinfo: str | None = None) -> Path:
    """Return the mount point of the cgroup2 hierarchy.

    `mountinfo` is the text of ``/proc/self/mountinfo``; it is read when not given.
    A mount of the hierarchy's root ("/") is preferred over a bind mount of a subtree.
    Raises CgroupError when no cgroup2 file system is mounted.
    """
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text(encoding="utf-8")
        except OSError as exc:
            raise CgroupError(
                f"cannot read /proc/self/mountinfo ({exc}): is /proc mounted?"
            ) from exc
    candidates: list[tuple[str, str]] = []  # (root within the fs, mount point)
    for line in mountinfo.splitlines():
        # id parent major:minor root mount_point options [optional...] - fstype source super
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if sep < 5 or len(fields) <= sep + 1 or fields[sep + 1] != "cgroup2":
            continue
        candidates.append((_unescape_mount_field(fields[3]), _unescape_mount_field(fields[4])))
    if not candidates:
        raise CgroupError(f"no cgroup2 file system is mounted; {MOUNT_HINT}")
    for root, mount_point in candidates:
        if root == "/":
            return Path(mount_point)
    return Path(candidates[0][1])


def named_cgroup(
    spec: str, root: Path, *, sandbox_ids: bool = False, allow_root: bool = False
) -> Path | None:
    """The cgroup v2 directory `spec` names, or None: its directory, its path under `root`
    as sandtrace prints it (/sandtrace/st-1a2b3c4d, with or without the leading slash), or
    its cgroup id (the directory's inode number); with `sandbox_ids`, also a bare sandbox
    id (st-1a2b3c4d). `root` itself only with `allow_root`."""
    candidates: list[Path] = []
    if spec.isdigit():
        ino = int(spec)
        for d, _subdirs, _files in os.walk(root):
            with contextlib.suppress(OSError):  # a cgroup removed meanwhile
                if Path(d).stat(follow_symlinks=False).st_ino == ino:
                    candidates.append(Path(d))
                    break
    else:
        given = Path(spec)
        if given.is_absolute():
            candidates.append(given.resolve())
        candidates.append((root / spec.lstrip("/")).resolve())
        if sandbox_ids and "/" not in spec:
            candidates.append(root / "sandtrace" / spec)
    for path in candidates:
        inside = path.is_relative_to(root) and (allow_root or path != root)
        if inside and (path / "cgroup.procs").exists():
            return path
    return None


def cgroup_id(path: Path) -> int:
    """The cgroup v2 id of the cgroup directory `path` (its inode number)."""
    try:
        return path.stat().st_ino
    except FileNotFoundError as exc:
        raise CgroupError(f"cgroup {path} does not exist") from exc


# --- resolving ids to paths ----------------------------------------------------------


def _walk_cgroup_dirs(root: Path) -> dict[int, str]:
    """Map cgroup id -> path relative to `root` ("/" for the root) for the whole tree.

    Directories that vanish during the walk are skipped silently.
    """
    found: dict[int, str] = {}
    try:
        found[root.stat().st_ino] = "/"
    except OSError:
        return found
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        directory, rel = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    try:
                        if not entry.is_dir(follow_symlinks=False):
                            continue
                        ino = entry.inode()
                    except OSError:
                        continue
                    child_rel = f"{rel}/{entry.name}"
                    found[ino] = child_rel
                    stack.append((entry.path, child_rel))
        except OSError:
            continue
    return found


class CgroupResolver:
    """Resolves cgroup ids to paths relative to the cgroup2 root, with a bounded cache.

    On a cache miss the tree is rescanned, at most once per `rescan_interval` seconds, so
    a stream of unknown ids cannot turn into a stream of tree walks. Ids that are still
    unknown (for example a cgroup removed before it was seen) resolve to "".
    Safe to use from several threads.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_entries: int = 8192,
        rescan_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.root = root
        self._max_entries = max_entries
        self._rescan_interval = rescan_interval
        self._clock = clock
        self._cache: OrderedDict[int, str] = OrderedDict()
        self._last_scan: float | None = None
        self._lock = threading.Lock()
        self.rescans = 0  # how many tree walks were done (for statistics and tests)

    def note(self, cgroup_id: int, path: str) -> None:
        """Pre-register a known id (e.g. a sandbox just created)."""
        with self._lock:
            self._put(cgroup_id, path)

    def path_of(self, cgroup_id: int) -> str:
        """The path of `cgroup_id` relative to the root ("/a/b"), or "" when unknown."""
        with self._lock:
            path = self._cache.get(cgroup_id)
            if path is not None:
                self._cache.move_to_end(cgroup_id)
                return path
            now = self._clock()
            if self._last_scan is not None and now - self._last_scan < self._rescan_interval:
                return ""
            self._last_scan = now
            self.rescans += 1
            tree = _walk_cgroup_dirs(self.root)
            for ino, rel in tree.items():
                if ino != cgroup_id:
                    self._put(ino, rel)
            path = tree.get(cgroup_id)
            if path is None:
                _log.debug("cgroup id unknown after rescan", cgroup_id=cgroup_id)
                return ""
            self._put(cgroup_id, path)  # last, so that it is the newest entry
            return path

    def _put(self, cgroup_id: int, path: str) -> None:
        self._cache[cgroup_id] = path
        self._cache.move_to_end(cgroup_id)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)


# --- container ids -------------------------------------------------------------------

_HEX64 = re.compile(r"[0-9a-f]{64}")
# systemd-driver scopes of container runtimes. The "-conmon-" scopes of cri-o and podman
# hold the container monitor, not the container, and do not match (no hex right after).
_SCOPE = re.compile(r"(?:docker|cri-containerd|crio|libpod|nerdctl)-(?P<id>[0-9a-f]{12,64})\.scope")
# cgroupfs-driver podman: /libpod_parent/libpod-<id>
_LIBPOD = re.compile(r"libpod-(?P<id>[0-9a-f]{12,64})")


def container_id_from_path(path: str) -> str:
    """The container id in a cgroup path, or "" when the path is not a container's.

    Recognised (the deepest matching component wins, so a container nested in another
    gives the inner id; components below the container, such as podman's "/container"
    or a sandbox made inside it, are skipped):

    - docker: ``/docker/<id>``, ``/system.slice/docker-<id>.scope``
    - containerd / CRI: ``.../cri-containerd-<id>.scope``, ``/kubepods/<qos>/pod<uid>/<id>``,
      nerdctl ``nerdctl-<id>.scope``
    - cri-o: ``.../crio-<id>.scope``
    - podman: ``libpod-<id>.scope`` (also ``.../libpod-<id>.scope/container``),
      ``/libpod_parent/libpod-<id>``

    Any component that is 64 lower-case hex digits is taken as a container id.
    """
    for component in reversed(path.split("/")):
        if not component:
            continue
        if _HEX64.fullmatch(component):
            return component
        match = _SCOPE.fullmatch(component) or _LIBPOD.fullmatch(component)
        if match:
            return match.group("id")
    return ""


# --- sandboxes -----------------------------------------------------------------------


def cgroup_of(pid: int) -> str:
    """The cgroup v2 path of a process, relative to the hierarchy's root ("/..." )."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


def _read_pids(procs_file: Path) -> set[int]:
    try:
        text = procs_file.read_text(encoding="ascii")
    except (FileNotFoundError, NotADirectoryError):
        return set()
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENOENT):  # cgroup being removed
            return set()
        raise
    return {int(word) for word in text.split()}


def _subtree_dirs(path: Path) -> list[Path]:
    """`path` and every cgroup directory below it, parents before children."""
    found: list[Path] = []
    stack = [path]
    while stack:
        directory = stack.pop()
        found.append(directory)
        try:
            with os.scandir(directory) as entries:
                stack.extend(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return found


def pids_in_subtree(path: Path) -> set[int]:
    """Every process in the cgroup `path` and in all cgroups below it."""
    pids: set[int] = set()
    for directory in _subtree_dirs(path):
        pids |= _read_pids(directory / "cgroup.procs")
    return pids


def _populated(path: Path) -> bool:
    """Whether any process lives in the subtree (from cgroup.events, else cgroup.procs)."""
    try:
        events = (path / "cgroup.events").read_text(encoding="ascii")
    except FileNotFoundError:
        return path.exists() and bool(pids_in_subtree(path))
    for line in events.splitlines():
        key, _, value = line.partition(" ")
        if key == "populated":
            return value.strip() != "0"
    return bool(pids_in_subtree(path))


@dataclass
class SandboxCgroup:
    """A cgroup made by sandtrace to run one sandbox in."""

    name: str  # "st-1a2b3c4d"
    path: Path  # absolute path of the cgroup directory
    id: int  # cgroup v2 id

    def add_pid(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the sandbox."""
        try:
            (self.path / "cgroup.procs").write_text(f"{pid}\n", encoding="ascii")
        except ProcessLookupError as exc:
            raise CgroupError(f"cannot move pid {pid} into {self.path}: no such process") from exc
        except FileNotFoundError as exc:
            raise CgroupError(f"sandbox cgroup {self.path} no longer exists") from exc
        except PermissionError as exc:
            raise CgroupError(
                f"not allowed to move pid {pid} into {self.path}: run sandtrace as root"
            ) from exc

    def join(self) -> None:
        """Move the calling process into the sandbox: pass as ``preexec_fn`` so that a child
        is inside before it execs (and so before its first event)."""
        (self.path / "cgroup.procs").write_text("0", encoding="ascii")

    def pids(self) -> set[int]:
        """Every process in the sandbox, including cgroups made inside it."""
        return pids_in_subtree(self.path)

    def destroy(self, timeout: float = 5.0) -> None:
        """Kill every process in the sandbox, then remove its cgroups bottom-up.

        Uses ``cgroup.kill`` when the kernel has it (5.14+), which also catches processes
        forking during the kill; otherwise freezes the subtree and sends SIGKILL to each
        process. Returns once nothing is left; calling it again is a no-op. Raises
        CgroupError when processes or cgroups survive `timeout` seconds.
        """
        if not self.path.exists():
            return
        deadline = time.monotonic() + timeout
        while True:
            self._kill_all()
            if self._remove_tree():
                _log.debug("sandbox cgroup removed", sandbox=self.name, path=str(self.path))
                return
            if time.monotonic() >= deadline:
                left = sorted(self.pids()) if self.path.exists() else []
                raise CgroupError(
                    f"could not remove sandbox cgroup {self.path} within {timeout:g}s "
                    f"(processes left: {left or 'none'}); processes stuck in "
                    "uninterruptible sleep (state D in ps) must finish first; "
                    "retry the removal later"
                )
            time.sleep(0.01)

    def _kill_all(self) -> None:
        kill_file = self.path / _KILL_FILE
        if kill_file.exists():
            with contextlib.suppress(FileNotFoundError):
                kill_file.write_text("1", encoding="ascii")
            return
        freeze_file = self.path / "cgroup.freeze"
        with contextlib.suppress(OSError):
            freeze_file.write_text("1", encoding="ascii")
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _remove_tree(self) -> bool:
        """Try to rmdir every cgroup in the subtree, children first; True when all gone."""
        if _populated(self.path):
            return False
        for directory in reversed(_subtree_dirs(self.path)):
            try:
                directory.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                    return False  # a task still exiting, or a cgroup made meanwhile
                raise CgroupError(f"cannot remove cgroup {directory}: {exc}") from exc
        return not self.path.exists()


def create_sandbox(root: Path, parent: str = "sandtrace") -> SandboxCgroup:
    """Make a new, empty sandbox cgroup ``<root>/<parent>/st-<8 random hex>``.

    The parent cgroup is created when missing and is left in place by
    `SandboxCgroup.destroy` (it is shared with other sandboxes).
    """
    if not (root / "cgroup.procs").is_file():
        raise CgroupError(
            f"{root} is not a cgroup2 hierarchy; find the cgroup2 mount in "
            f"/proc/self/mountinfo (find_cgroup2_root) or {MOUNT_HINT}"
        )
    parent_dir = root / parent
    try:
        for _ in range(16):
            # made again each try: another process may remove an empty parent meanwhile
            parent_dir.mkdir(parents=True, exist_ok=True)
            name = f"st-{secrets.token_hex(4)}"
            path = parent_dir / name
            try:
                path.mkdir()
            except (FileExistsError, FileNotFoundError):
                continue
            break
        else:
            raise CgroupError(f"could not make a new sandbox cgroup under {parent_dir}")
    except PermissionError as exc:
        raise CgroupError(f"not allowed to create cgroups under {root}: run as root") from exc
    except OSError as exc:
        raise CgroupError(f"cannot create a sandbox cgroup under {parent_dir}: {exc}") from exc
    sandbox = SandboxCgroup(name=name, path=path, id=cgroup_id(path))
    _log.debug("sandbox cgroup created", sandbox=name, path=str(path), cgroup_id=sandbox.id)
    return sandbox


def remove_parent_if_unused(root: Path, parent: str = "sandtrace") -> bool:
    """Remove the cgroup sandboxes share (create_sandbox's `parent`) if no sandbox is left
    in it; True when it is gone. For whoever made it only to run sandboxes for a while (the
    test suite, the benchmarks): `sandtrace run` leaves it, as a running `watch` may be
    tracing it."""
    try:
        (root / parent).rmdir()
    except FileNotFoundError:
        pass
    except OSError:  # a sandbox in it (EBUSY, ENOTEMPTY), or not ours to remove
        return False
    return True


# --- what to watch by default --------------------------------------------------------

_DEFAULT_SCOPE_PATTERNS = (
    "sandtrace",  # sandboxes made by sandtrace itself
    "docker",  # docker, cgroupfs driver: /docker/<id>
    "system.slice/docker-*.scope",  # docker, systemd driver
    "kubepods",  # kubelet (containerd or cri-o), cgroupfs driver
    "kubepods.slice",  # kubelet, systemd driver
    "machine.slice/libpod-*.scope",  # podman (rootful), systemd driver
    "libpod_parent",  # podman, cgroupfs driver
    "system.slice/nerdctl-*.scope",  # containerd via nerdctl, systemd driver
)


def default_scopes(root: Path) -> list[Path]:
    """The cgroups ``sandtrace watch`` traces when given no selector: those that exist of

    - ``<root>/sandtrace`` (sandtrace's own sandboxes);
    - docker: ``<root>/docker`` (cgroupfs driver) and ``<root>/system.slice/docker-*.scope``
      (systemd driver; one per running container);
    - Kubernetes (containerd or cri-o): ``<root>/kubepods`` and ``<root>/kubepods.slice``;
    - podman: ``<root>/machine.slice/libpod-*.scope`` (not the ``libpod-conmon-*`` monitor
      scopes) and ``<root>/libpod_parent``;
    - containerd without Kubernetes, started by nerdctl: ``system.slice/nerdctl-*.scope``.

    ``system.slice/containerd.service`` is deliberately absent: it holds the daemon, not
    containers. Per-container scopes are the ones present now; containers started later
    under ``system.slice`` need a new call. Sorted, without duplicates.
    """
    scopes: set[Path] = set()
    for pattern in _DEFAULT_SCOPE_PATTERNS:
        for path in root.glob(pattern):
            if not path.is_dir() or path.is_symlink():
                continue
            if "*" in pattern and not container_id_from_path(path.name):
                continue  # e.g. libpod-conmon-<id>.scope
            scopes.add(path)
    return sorted(scopes)
