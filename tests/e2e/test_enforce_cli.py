"""`--enforce` refuses what it cannot do, before anything is loaded: each usage error says
what is wrong and what to give instead, on one line, with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = [
    (
        ["run", "--enforce", "--", "true"],
        "sandtrace: --enforce holds each sandbox to its egress policy: give --egress-allow "
        "(names such as pypi.org or *.githubusercontent.com, networks, ports) or "
        "--egress-policy",
    ),
    (
        ["watch", "--all", "--enforce", "--egress-allow", "pypi.org"],
        "sandtrace: --enforce applies to sandbox cgroups; watch --all traces the whole host",
    ),
    (
        ["watch", "--pid", "1", "--enforce", "--egress-allow", "pypi.org"],
        "sandtrace: --enforce applies to sandbox cgroups (watch --cgroup), not to --pid",
    ),
    (
        ["run", "--enforce", "--egress-allow", "pypi.org", "--no-connect-hook", "--", "true"],
        "sandtrace: --enforce refuses connects in the connect hooks: drop --no-connect-hook",
    ),
    (
        ["run", "--dns-ttl-floor", "5", "--", "true"],
        "sandtrace: --dns-ttl-floor applies to --enforce",
    ),
    (
        ["run", "--enforce", "--egress-allow", "pypi.org", "--dns-ttl-floor", "-1", "--", "true"],
        "sandtrace: --dns-ttl-floor -1: expected seconds, 0 to 86400",
    ),
    (
        ["run", "--enforce", "--egress-allow", "10.0.0.0/8:99999", "--", "true"],
        "sandtrace: --egress-allow: egress allow-list entry '10.0.0.0/8:99999': port 99999 is "
        "out of range (expected ports 1-65535: one (443), a range (8000-8100) or a list "
        "(80,443))",
    ),
]


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_usage_errors_name_the_problem(argv: list[str], message: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "sandtrace", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (run.returncode, run.stderr.splitlines()) == (2, [message])
