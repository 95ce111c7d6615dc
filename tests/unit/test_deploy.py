"""The files in deploy/: systemd units that systemd accepts, a service unit systemd rates as
well confined, an example configuration that `sandtrace serve --check-config` accepts, and
the service unit's ExecStart run the way systemd would run it.

There is no systemd running here (PID 1 is not systemd), so the units are checked offline
with systemd-analyze (verify, and security --offline), not started. What DynamicUser= and
LoadCredential= would do is done by hand instead: the credentials (the configuration and
the secrets it names, root-only files) copied to a directory of 0400 files owned by an
unprivileged user, and the unit's own ExecStart run as that user (setpriv) with
$CREDENTIALS_DIRECTORY pointing there; it must serve over TLS and answer /readyz.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving import ROOT_DIR, free_port
from tests.tlsutil import make_tls

DEPLOY = ROOT_DIR / "deploy"
SANDTRACE = ROOT_DIR / ".venv" / "bin" / "sandtrace"
ANALYZE = shutil.which("systemd-analyze") or "systemd-analyze"  # part of Debian's systemd
INSTALLED = "/opt/sandtrace/bin/sandtrace"  # where the units' install steps put it
NOBODY = pwd.getpwnam("nobody")


def local_units(tmp_path: Path) -> list[Path]:
    """The units with ExecStart pointing at this checkout's sandtrace (verify checks it)."""
    out = []
    for unit in sorted(DEPLOY.glob("*.service")):
        text = unit.read_text()
        assert INSTALLED in text, unit
        text = text.replace(INSTALLED, str(SANDTRACE))
        out.append(tmp_path / unit.name)
        out[-1].write_text(text)
    return out


def test_units_verify(tmp_path: Path) -> None:
    units = local_units(tmp_path)
    assert [u.name for u in units] == ["sandtrace-collector.service", "sandtrace-service.service"]
    done = subprocess.run(
        [ANALYZE, "verify", *map(str, units)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_verify_fails_on_a_unit_systemd_would_not_run_as_written(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key (systemd ignores it, with a warning) and an
    ExecStart that is not there."""
    unit = next(u for u in local_units(tmp_path) if u.name == "sandtrace-service.service")
    text = unit.read_text()
    for broken in (
        text.replace("LoadCredential=token:", "LoadCredentials=token:"),
        text.replace(str(SANDTRACE), "/nonexistent/sandtrace"),
    ):
        unit.write_text(broken)
        done = subprocess.run(
            [ANALYZE, "verify", str(unit)], capture_output=True, text=True, check=False
        )
        assert done.returncode != 0 or done.stderr.strip(), broken


def test_service_unit_is_well_confined(tmp_path: Path) -> None:
    unit = next(u for u in local_units(tmp_path) if u.name == "sandtrace-service.service")
    done = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", done.stdout)
    assert m, done.stdout + done.stderr
    assert float(m.group(1)) <= 1.5 and m.group(2) == "OK", m.group(0)


def test_example_configuration_passes_check_config(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls", ["127.0.0.1"])
    text = (DEPLOY / "service.toml").read_text()
    # the secrets beside the configuration, under the names its relative paths give
    (tmp_path / "token").write_text("t\n")
    for name, source in (("service.pem", tls.cert), ("service.key", tls.key)):
        shutil.copy(source, tmp_path / name)
    shutil.copy(tls.ca, tmp_path / "syslog-ca.pem")
    for old, new in {
        "/var/lib/sandtrace-service": tmp_path / "state",
        "/var/log/sandtrace": tmp_path / "log",
    }.items():
        assert old in text
        text = text.replace(old, str(new))
    (tmp_path / "log").mkdir()  # systemd makes it (LogsDirectory=)
    conf = tmp_path / "service.toml"
    conf.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "sandtrace", "serve", "--config", str(conf), "--check-config"],
        cwd=ROOT_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "2 outputs (alerts-file, syslog)" in done.stderr


def unit_settings(unit: Path, key: str) -> list[str]:
    """The values of `key=` in a unit, continuation lines joined."""
    text = unit.read_text().replace("\\\n", " ")
    return [
        line.split("=", 1)[1].strip() for line in text.splitlines() if line.startswith(f"{key}=")
    ]


def credentials(unit: Path) -> dict[str, Path]:
    """LoadCredential=NAME:SOURCE lines of a unit, as {NAME: SOURCE}."""
    return {
        name: Path(source)
        for name, _, source in (v.partition(":") for v in unit_settings(unit, "LoadCredential"))
    }


def relative_paths(config: Path) -> set[str]:
    """The relative paths in a service configuration (those the credentials must provide)."""
    data = tomllib.loads(config.read_text())
    server = [data["server"].get(k, "") for k in ("token_file", "tls_cert", "tls_key")]
    outputs = [
        o.get(k, "") for o in data["output"] for k in ("ca_file", "token_file", "api_key_file")
    ]
    return {p for p in [*server, *outputs] if p and not Path(p).is_absolute()}


def test_credentials_match_the_configuration_and_the_install_steps() -> None:
    """What the service reads comes from its credentials: the configuration, and every file
    its relative paths name; each credential's source is made by an install step."""
    unit = DEPLOY / "sandtrace-service.service"
    creds = credentials(unit)
    (exec_start,) = unit_settings(unit, "ExecStart")
    assert shlex.split(exec_start) == [
        INSTALLED,
        "serve",
        "--config",
        "${CREDENTIALS_DIRECTORY}/service.toml",
    ]
    assert set(creds) == {"service.toml"} | relative_paths(DEPLOY / "service.toml")
    steps = [line for line in unit.read_text().splitlines() if line.startswith("#")]
    installs = " ".join(line for line in steps if "install " in line)
    for name, source in creds.items():
        assert source.parent == Path("/etc/sandtrace"), (name, source)
        assert source.name in installs, f"no install step makes {source}"
    assert "ProtectHome=yes" in unit.read_text()  # fine: /opt/sandtrace is not under /home
    collector = DEPLOY / "sandtrace-collector.service"
    assert credentials(collector) == {"token": Path("/etc/sandtrace/token")}
    assert (
        "--server-token-file ${CREDENTIALS_DIRECTORY}/token"
        in unit_settings(collector, "ExecStart")[0]
    )
    for u in (unit, collector):  # nothing points at files the install does not make
        assert not unit_settings(u, "Documentation"), u
        assert "/usr/local/bin" not in u.read_text() and ".venv" not in u.read_text()


@pytest.fixture
def world_traversable_dir() -> Iterator[Path]:
    """A fresh directory an unprivileged user can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="sandtrace-deploy-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(*argv: str) -> list[str]:
    return [
        "setpriv",
        f"--reuid={NOBODY.pw_uid}",
        f"--regid={NOBODY.pw_gid}",
        "--clear-groups",
        "--no-new-privs",
        *argv,
    ]


def installed_etc(place: Path, port: int) -> Path:
    """/etc/sandtrace as the install steps leave it: the example configuration (listening on
    loopback here, syslog to a closed local port) and its secrets, root-only (0700, 0600)."""
    etc = place / "etc-sandtrace"
    etc.mkdir(mode=0o700)
    tls = make_tls(place / "tls", ["127.0.0.1"])
    text = (DEPLOY / "service.toml").read_text()
    for old, new in {
        "0.0.0.0:8780": f"127.0.0.1:{port}",
        "/var/lib/sandtrace-service": str(place / "var-lib"),
        "/var/log/sandtrace": str(place / "var-log"),
        "syslog.internal:6514": f"127.0.0.1:{free_port()}",
    }.items():
        assert old in text
        text = text.replace(old, new)
    (etc / "service.toml").write_text(text)
    (etc / "token").write_text("s3cret\n")
    shutil.copy(tls.cert, etc / "service.pem")
    shutil.copy(tls.key, etc / "service.key")
    shutil.copy(tls.ca, etc / "syslog-ca.pem")
    shutil.copy(tls.ca, place / "ca.pem")  # for the test's client
    for f in etc.iterdir():
        f.chmod(0o600)
    # StateDirectory= and LogsDirectory=: made by systemd, owned by the service's user
    for d in ("var-lib", "var-log"):
        (place / d).mkdir(mode=0o700)
        os.chown(place / d, NOBODY.pw_uid, NOBODY.pw_gid)
    return etc


def test_service_exec_start_serves_as_an_unprivileged_user_from_its_credentials(
    world_traversable_dir: Path,
) -> None:
    place = world_traversable_dir
    port = free_port()
    etc = installed_etc(place, port)
    unit = DEPLOY / "sandtrace-service.service"
    # The root-only files themselves are out of the service user's reach (why credentials)
    direct = subprocess.run(
        as_nobody(str(SANDTRACE), "serve", "--config", str(etc / "service.toml")),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        check=False,
    )
    assert direct.returncode == 2 and "Permission denied" in direct.stderr, direct.stderr
    assert "Traceback" not in direct.stderr
    # LoadCredential=: a copy of each source, 0400, owned by the service's user, in a
    # directory only that user can read
    creds = place / "credentials"
    creds.mkdir(mode=0o500)
    for name, source in credentials(unit).items():
        target = creds / name
        shutil.copy(etc / source.name, target)
        target.chmod(0o400)
        os.chown(target, NOBODY.pw_uid, NOBODY.pw_gid)
    os.chown(creds, NOBODY.pw_uid, NOBODY.pw_gid)
    (exec_start,) = unit_settings(unit, "ExecStart")
    argv = [
        a.replace("${CREDENTIALS_DIRECTORY}", str(creds)).replace(INSTALLED, str(SANDTRACE))
        for a in shlex.split(exec_start)
    ]
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen(
        as_nobody(*argv), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
    )
    try:
        ctx = ssl.create_default_context(cafile=str(place / "ca.pem"))
        request = urllib.request.Request(
            f"https://127.0.0.1:{port}/readyz", headers={"Authorization": "Bearer s3cret"}
        )
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                with urllib.request.urlopen(request, context=ctx, timeout=5) as resp:  # noqa: S310
                    assert resp.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "the service did not answer /readyz"
                time.sleep(0.2)
        owner = Path(f"/proc/{proc.pid}/status").read_text()
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert f"Uid:\t{NOBODY.pw_uid}\t{NOBODY.pw_uid}" in owner  # setpriv execs: this is serve
    assert f"serving on https://127.0.0.1:{port}" in err
    assert (place / "var-log" / "alerts.jsonl").stat().st_uid == NOBODY.pw_uid
