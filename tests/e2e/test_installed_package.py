"""sandtrace as a user installs it: the wheel built from this checkout, installed into fresh
virtual environments outside the checkout, run from a directory where no checkout is.

- with the distribution's site packages (where BCC's module lives), `sandtrace run` traces a
  real /bin/true with the probes' C sources from the wheel, and `serve --check-config`
  loads the built-in pack from the wheel;
- without them (no BCC) and as an unprivileged user, `sandtrace serve` checks its
  configuration and serves: the service never needs the collector's parts.

The wheel's dependencies come from the package index, like a user's `pip install`.
"""

from __future__ import annotations

import json
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving import free_port

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = pwd.getpwnam("nobody")
UNSHIPPED = (
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
)


def _run(
    cmd: list[str], cwd: Path | None = None, *, nobody: bool = False, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """cmd's outcome; as the unprivileged user `nobody` when asked."""
    who = NOBODY if nobody else None
    return subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        user=who.pw_uid if who else None,
        group=who.pw_gid if who else None,
        extra_groups=[] if who else None,
    )


def _ok(cmd: list[str], cwd: Path | None = None) -> str:
    done = _run(cmd, cwd)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def place() -> Iterator[Path]:
    """A directory outside the checkout that the unprivileged user can read."""
    path = Path(tempfile.mkdtemp(prefix="sandtrace-pkg-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel(place: Path) -> Path:
    # Built from a copy: setuptools keeps a build/ directory in the source tree, and stale
    # modules left there by an earlier build would end up in the wheel.
    source = place / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*UNSHIPPED))
    out = place / "dist"
    _ok([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)])
    (built,) = out.glob("sandtrace-*.whl")
    return built


def _venv(place: Path, name: str, wheel: Path, *, system_site: bool) -> Path:
    env = place / name
    flags = ["--system-site-packages"] if system_site else []
    _ok([SYSTEM_PYTHON, "-m", "venv", *flags, str(env)])
    _ok([str(env / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)])
    return env


@pytest.fixture(scope="module")
def with_bcc(place: Path, wheel: Path) -> Path:
    return _venv(place, "venv-bcc", wheel, system_site=True)


@pytest.fixture(scope="module")
def without_bcc(place: Path, wheel: Path) -> Path:
    return _venv(place, "venv-plain", wheel, system_site=False)


def test_the_wheel_carries_every_probe_source_and_rule(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"probes/bpf/{p.relative_to(ROOT / 'bpf')}" for p in (ROOT / "bpf").rglob("*")}
    rules = {f"detect/rules/{p.relative_to(ROOT / 'rules')}" for p in (ROOT / "rules").rglob("*")}
    wanted = {n for n in sources | rules if n.endswith((".c", ".h", ".yml"))}
    assert len(wanted) > 20
    assert wanted - names == set()
    assert "sandtrace/cli.py" in names
    assert "api/events.py" in names
    modules = {n for n in names if n.endswith(".py")}
    assert modules == {str(p.relative_to(ROOT)) for p in _shipped_modules()}


def _shipped_modules() -> list[Path]:
    layers = ("sandtrace", "api", "probes", "collector", "detect", "service", "tail", "fleet")
    return [p for layer in layers for p in (ROOT / layer).rglob("*.py")]


def test_installed_sandtrace_runs_a_command_traced(with_bcc: Path, place: Path) -> None:
    exe = str(with_bcc / "bin" / "sandtrace")
    assert _ok([exe, "--version"], cwd=place).startswith("sandtrace ")
    where = _ok(
        [
            str(with_bcc / "bin" / "python"),
            "-c",
            "import probes.loader, detect.pack;"
            "print(probes.loader.__file__); print(detect.pack.builtin_rules())",
        ],
        cwd=place,
    )
    assert all(line.startswith(str(with_bcc)) for line in where.split()), where
    done = _run(
        [exe, "run", "--json", "--no-tail", "--", "/bin/sh", "-c", "echo $$; exec /bin/true"],
        cwd=place,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # with --json the shell's own output goes to stderr: stdout is JSON lines only
    shell_pid = int(next(line for line in done.stderr.splitlines() if line.isdigit()))
    events = [json.loads(line) for line in done.stdout.splitlines()]
    execs = [e for e in events if e["kind"] == "exec"]
    assert [(e["process"]["pid"], e["filename"]) for e in execs] == [
        (shell_pid, "/bin/sh"),
        (shell_pid, "/bin/true"),
    ]
    exits = [e for e in events if e["kind"] == "exit"]
    assert [(e["process"]["pid"], e["exit_code"]) for e in exits] == [(shell_pid, 0)]


def _pack_size() -> int:
    from detect.loader import load_paths  # noqa: PLC0415
    from detect.pack import builtin_rules  # noqa: PLC0415

    rules = load_paths([builtin_rules()])
    return len(rules.rules)


def test_installed_serve_loads_the_built_in_pack(with_bcc: Path, place: Path) -> None:
    out = _run([str(with_bcc / "bin" / "sandtrace"), "serve", "--check-config"], cwd=place)
    assert out.returncode == 0, out.stderr
    assert "configuration OK" in out.stdout + out.stderr
    assert f"{_pack_size()} rules" in out.stdout + out.stderr


def test_serve_runs_without_bcc_and_without_root(without_bcc: Path, place: Path) -> None:
    python = str(without_bcc / "bin" / "python")
    probe = _run([python, "-c", "import bcc"], cwd=place)
    assert probe.returncode != 0 and "No module named 'bcc'" in probe.stderr
    exe = str(without_bcc / "bin" / "sandtrace")
    check = _run([exe, "serve", "--check-config"], place, nobody=True)
    assert check.returncode == 0, check.stderr
    assert f"{_pack_size()} rules" in check.stdout + check.stderr
    port = free_port()
    serve = subprocess.Popen(
        [exe, "serve", "--listen", f"127.0.0.1:{port}"],
        cwd=place,
        user=NOBODY.pw_uid,
        group=NOBODY.pw_gid,
        extra_groups=[],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert serve.poll() is None, serve.communicate()[1]
                assert time.monotonic() < deadline, "serve did not become ready in 60 s"
                time.sleep(0.2)
        status = Path(f"/proc/{serve.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1] == str(NOBODY.pw_uid)
    finally:
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=30)
    assert serve.returncode == 0, err
