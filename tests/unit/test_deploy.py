"""The files in deploy/: systemd units that systemd accepts, a service unit systemd rates as
well confined, and an example configuration that `sandtrace serve --check-config` accepts.

There is no systemd running here (PID 1 is not systemd), so the units are checked offline
with systemd-analyze (verify, and security --offline), not started.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.serving import ROOT_DIR
from tests.tlsutil import make_tls

DEPLOY = ROOT_DIR / "deploy"
SANDTRACE = ROOT_DIR / ".venv" / "bin" / "sandtrace"
ANALYZE = shutil.which("systemd-analyze") or "systemd-analyze"  # part of Debian's systemd


def local_units(tmp_path: Path) -> list[Path]:
    """The units with ExecStart pointing at this checkout's sandtrace (verify checks it)."""
    out = []
    for unit in sorted(DEPLOY.glob("*.service")):
        text = unit.read_text().replace("/usr/local/bin/sandtrace", str(SANDTRACE))
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
    (tmp_path / "token").write_text("t\n")
    text = (DEPLOY / "service.toml").read_text()
    for old, new in {
        "/etc/sandtrace/token": tmp_path / "token",
        "/etc/sandtrace/tls/service.pem": tls.cert,
        "/etc/sandtrace/tls/service.key": tls.key,
        "/etc/sandtrace/tls/ca.pem": tls.ca,
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
