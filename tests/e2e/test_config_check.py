"""`sandtrace serve --check-config`, and serve itself, on bad configurations: the real command
(python -m sandtrace), its exit status and everything it says.

A configuration with a problem in every table is refused with every problem listed at once
(file, table, key, what is expected; outputs counted from 1), no traceback; serve refuses to
start with the same report; a rule that cannot load is an error unless accepted knowingly,
and then each refused rule is named in a warning.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.serving import ROOT_DIR, free_port, serving

REFUSED_RULE = """title: Suspicious Windows shell
id: 5b7f3c2e-0000-4000-8000-00000000c0de
logsource: {product: windows, category: process_creation}
detection: {s: {Image|endswith: '\\\\cmd.exe'}, condition: s}
level: high
"""


def sandtrace_serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandtrace", "serve", *args],
        cwd=ROOT_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def problem_lines(stderr: str) -> list[str]:
    """The report's problem lines (after 'configuration error: N problems:')."""
    prefix = "sandtrace:   "
    return [line.removeprefix(prefix) for line in stderr.splitlines() if line.startswith(prefix)]


def bad_config(tmp: Path) -> tuple[Path, list[str]]:
    """A configuration with a problem in every table, and the start of each problem line."""
    not_a_cert = tmp / "ca.pem"
    not_a_cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    alerts = tmp / "alerts.jsonl"
    (tmp / "sub").mkdir()  # the second output names the same file by another path
    conf = tmp / "service.toml"
    conf.write_text(f"""
[server]
listen = "127.0.0.1:99999"
read_timeout = "30s"
token_file = "{tmp / "no-such-token"}"

[detection]
egress_allow = ["10.0.0.0/8:99999", "192.0.2.0/24:80-70", "not a network"]
fold_seconds = -5
builtin = true

[tail]
queue = 0

[[output]]
type = "jsonl"
name = "alerts-file"
path = "{alerts}"
what = "alerts"

[[output]]
type = "jsonl"
name = "copy"
path = "{tmp / "sub" / ".." / "alerts.jsonl"}"

[[output]]
type = "syslog"
name = "siem"
address = "siem.internal:6514"
tls = true
ca_file = "{not_a_cert}"
facility = "local9"
""")
    return conf, [
        f"{conf}: [server] read_timeout: '30s' is a string; expected a number of seconds",
        f"{conf}: [detection] builtin: unknown key (expected one of rules, builtin_rules, ",
        f"{conf}: [server] listen: '127.0.0.1:99999': expected HOST:PORT with a port 1-65535",
        f"{conf}: [tail] queue: 0: expected a positive integer",
        f"{conf}: [detection] fold_seconds: -5: expected 0 (every alert alone) or more",
        f"{conf}: [server] token_file: cannot read {tmp / 'no-such-token'}",
        f"{conf}: [detection] egress_allow: egress allow-list entry '10.0.0.0/8:99999': "
        "port 99999 is out of range (expected ports 1-65535",
        f"{conf}: [detection] egress_allow: egress allow-list entry '192.0.2.0/24:80-70': "
        "range 80-70 runs backwards",
        f"{conf}: [detection] egress_allow: egress allow-list entry 'not a network': ",
        f"{conf}: [[output]] #2 (copy) path: {tmp / 'sub' / '..' / 'alerts.jsonl'} is also "
        f"written by {conf}: [[output]] #1 (alerts-file); expected a file of its own",
        f"{conf}: [[output]] #3 (siem) facility: 'local9': expected a facility name",
        f"{conf}: [[output]] #3 (siem) ca_file: {not_a_cert} holds no usable certificate",
    ]


def assert_reports_every_problem(
    done: subprocess.CompletedProcess[str], expected: list[str]
) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = problem_lines(done.stderr)
    assert f"sandtrace: configuration error: {len(expected)} problems:" in done.stderr
    assert len(lines) == len(expected), done.stderr
    for start in expected:
        assert sum(line.startswith(start) for line in lines) == 1, (start, done.stderr)


def test_check_config_lists_every_problem_at_once(tmp_path: Path) -> None:
    conf, expected = bad_config(tmp_path)
    done = sandtrace_serve("--config", str(conf), "--check-config")
    assert_reports_every_problem(done, expected)
    assert "configuration OK" not in done.stderr


def test_serve_refuses_to_start_with_the_same_report(tmp_path: Path) -> None:
    conf, expected = bad_config(tmp_path)
    done = sandtrace_serve("--config", str(conf))
    assert_reports_every_problem(done, expected)
    assert "serving on" not in done.stderr
    assert done.stderr.rstrip().endswith("check it with: sandtrace serve --check-config")


def test_command_line_settings_are_named_by_their_option(tmp_path: Path) -> None:
    log = tmp_path / "both.jsonl"
    done = sandtrace_serve(
        "--listen",
        "nowhere",
        "--egress-allow",
        "198.51.100.0/24:65536",
        "--alerts",
        str(log),
        "--events",
        str(log),
        "--check-config",
    )
    assert_reports_every_problem(
        done,
        [
            "--listen: 'nowhere': expected HOST:PORT",
            "--egress-allow: egress allow-list entry '198.51.100.0/24:65536': port 65536 is out "
            "of range",
            f"--events path: {log} is also written by --alerts; expected a file of its own",
        ],
    )


def test_a_refused_rule_fails_the_check_unless_accepted(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "windows.yml").write_text(REFUSED_RULE)
    conf = tmp_path / "service.toml"
    conf.write_text(f'[detection]\nrules = ["{rules}"]\n')
    where = f"{rules / 'windows.yml'}: Suspicious Windows shell"

    refused = sandtrace_serve("--config", str(conf), "--check-config")
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr and "configuration OK" not in refused.stderr
    assert (
        f"sandtrace: configuration error: {conf}: [detection] rules: {where}: rule "
        "refused: log source product=windows" in refused.stderr
    )
    assert "--allow-refused-rules" in refused.stderr  # the way out, said

    accepted = sandtrace_serve("--config", str(conf), "--check-config", "--allow-refused-rules")
    assert accepted.returncode == 0, accepted.stderr
    assert (
        f"sandtrace: warning: rule refused, accepted (allow_refused_rules): {where}: "
        in accepted.stderr
    )
    assert "rules (1 refused)" in accepted.stderr and "configuration OK" in accepted.stderr

    conf.write_text(f'[detection]\nrules = ["{rules}"]\nallow_refused_rules = true\n')
    by_key = sandtrace_serve("--config", str(conf), "--check-config")
    assert by_key.returncode == 0 and "warning: rule refused, accepted" in by_key.stderr


def test_serve_refuses_a_refused_rule_and_starts_when_it_is_accepted(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "windows.yml").write_text(REFUSED_RULE)
    port = free_port()
    refused = sandtrace_serve("--rules", str(rules), "--listen", f"127.0.0.1:{port}")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert f"--rules: {rules / 'windows.yml'}: Suspicious Windows shell: rule refused" in (
        refused.stderr
    )
    assert "serving on" not in refused.stderr
    with serving(["--rules", str(rules), "--allow-refused-rules"]) as svc:
        with urllib.request.urlopen(f"{svc.url}/readyz", timeout=10) as resp:  # noqa: S310
            assert resp.status == 200
        assert f"{rules / 'windows.yml'}: Suspicious Windows shell" in svc.log()
        assert svc.stop() == 0
