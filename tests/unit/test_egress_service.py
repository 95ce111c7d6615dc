"""The detection service's egress policy: `[detection] resolvers` and `egress_policy` (a
policy file beside the configuration) checked with every problem named, and a real `sandtrace
serve` re-reading its policy file on SIGHUP for the engines it already has."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from api.events import AnyEvent
from api.wire import encode_batch
from detect.testing import event_from_fields
from tests.serving import ROOT_DIR, Serving, serving
from tests.unit.test_serve_process import post


def serve_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandtrace", "serve", *args],
        cwd=ROOT_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_policy_file_beside_the_configuration_is_checked(tmp_path: Path) -> None:
    (tmp_path / "egress.toml").write_text(
        '[default]\nallow = ["pypi.org:443", "10.0.0.0/8"]\nresolvers = ["192.0.2.53"]\n'
    )
    conf = tmp_path / "service.toml"
    conf.write_text('[detection]\negress_policy = "egress.toml"\n')  # beside the file
    done = serve_cmd("--config", str(conf), "--check-config")
    assert done.returncode == 0, done.stderr
    assert "2 egress allow-list entries" in done.stderr


@pytest.mark.parametrize(
    ("detection", "policy", "problems"),
    [
        (
            'egress_policy = "egress.toml"',
            '[default]\nallow = ["x y", "pypi.org:0"]\nresolvers = ["dns"]\n',
            [
                "CONF: [detection] egress_policy: DIR/egress.toml: [default] allow[0]: 'x y': ",
                "CONF: [detection] egress_policy: DIR/egress.toml: [default] allow[1]: "
                "'pypi.org:0': port 0 is out of range",
                "CONF: [detection] egress_policy: DIR/egress.toml: [default] resolvers[0]: "
                "'dns' is not an IP address",
            ],
        ),
        (
            'egress_policy = "egress.toml"\negress_allow = ["pypi.org"]',
            '[default]\nallow = ["pypi.org"]\n',
            [
                "CONF: [detection] egress_policy: the policy file holds the whole policy "
                "(expected CONF: [detection] egress_allow in the file instead: allow, "
                "resolvers, check_loopback)"
            ],
        ),
        (
            'resolvers = ["192.0.2.53"]',
            "",
            [
                "CONF: [detection] resolvers: applies to an egress allow-list, and there is "
                "none (expected [detection] egress_allow entries too, or no resolvers)"
            ],
        ),
        (
            'egress_allow = ["pypi.org"]\nresolvers = ["192.0.2.300", "web=192.0.2.53:53"]',
            "",
            [
                "CONF: [detection] resolvers: resolver '192.0.2.300': '192.0.2.300' is not an "
                "IP address",
                "CONF: [detection] resolvers: resolver 'web=192.0.2.53:53': '192.0.2.53:53' is "
                "not an IP address",
            ],
        ),
    ],
)
def test_every_egress_problem_of_the_configuration_is_named(
    tmp_path: Path, detection: str, policy: str, problems: list[str]
) -> None:
    if policy:
        (tmp_path / "egress.toml").write_text(policy)
    conf = tmp_path / "service.toml"
    conf.write_text(f"[detection]\n{detection}\n")
    done = serve_cmd("--config", str(conf), "--check-config")
    assert done.returncode == 2, done.stderr
    said = [
        line.removeprefix("sandtrace:").strip().removeprefix("configuration error: ")
        for line in done.stderr.splitlines()
    ]
    said = [line for line in said if not line.endswith(" problems:")]
    expected = [p.replace("CONF", str(conf)).replace("DIR", str(tmp_path)) for p in problems]
    assert len(said) == len(expected), done.stderr
    for line, start in zip(said, expected, strict=True):
        assert line.startswith(start), done.stderr


def connect(pid: int, hostname: str) -> AnyEvent:
    return event_from_fields(
        "network_connection",
        {
            "DestinationIp": "203.0.113.9",
            "DestinationPort": 443,
            "DestinationHostname": hostname,
            "ProcessId": pid,
        },
    )


def egress_alerts(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text().splitlines() if path.exists() else []
    alerts = [json.loads(line) for line in lines]
    return [
        (a["process"]["pid"], a["description"])
        for a in alerts
        if a["rule_id"] == "sandtrace-egress-allow-list"
    ]


def test_serve_rereads_its_policy_file_on_sighup(tmp_path: Path) -> None:
    token_file, alerts = tmp_path / "token", tmp_path / "alerts.jsonl"
    token_file.write_text("t0ken\n")
    policy = tmp_path / "egress.toml"
    policy.write_text('[default]\nallow = ["pypi.org:443"]\n')
    conf = tmp_path / "service.toml"
    conf.write_text('[detection]\negress_policy = "egress.toml"\n')
    args = ["--config", str(conf), "--token-file", str(token_file), "--alerts", str(alerts)]
    with serving(args) as svc:
        url = f"{svc.url}/v1/batches"
        batch = [connect(1, "pypi.org"), connect(2, "github.com")]
        assert post(url, encode_batch("c1", 0, batch), "t0ken") == (200, {"ack": 0})
        not_listed = "tcp 203.0.113.9:443 (github.com) is not on the allow-list"
        assert egress_alerts(alerts) == [(2, not_listed)]

        policy.write_text('[default]\nallow = ["pypi.org:443", "bad name"]\n')
        svc.proc.send_signal(signal.SIGHUP)
        wait_log(svc, "not reloaded")
        assert f"sandtrace: SIGHUP: {policy}: [default] allow[1]: 'bad name'" in svc.log()
        assert post(url, encode_batch("c1", 1, [connect(3, "github.com")]), "t0ken")[0] == 200
        assert egress_alerts(alerts) == [(2, not_listed), (3, not_listed)]  # the old policy

        policy.write_text('[default]\nallow = ["pypi.org:443", "github.com:443"]\n')
        svc.proc.send_signal(signal.SIGHUP)
        wait_log(svc, f"SIGHUP: egress policy {policy} of 2")
        assert post(url, encode_batch("c1", 2, [connect(4, "github.com")]), "t0ken")[0] == 200
        assert egress_alerts(alerts) == [(2, not_listed), (3, not_listed)]  # silent now
        assert svc.stop() == 0


def wait_log(svc: Serving, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in svc.log():
        assert time.monotonic() < deadline, svc.log()
        time.sleep(0.05)


def test_sighup_without_a_policy_file_leaves_serve_running(tmp_path: Path) -> None:
    # A reload signal (systemctl reload, a hangup) must not end a service that has nothing
    # to re-read: it says so and goes on taking batches.
    token_file = tmp_path / "token"
    token_file.write_text("t0ken\n")
    with serving(["--token-file", str(token_file)]) as svc:
        svc.proc.send_signal(signal.SIGHUP)
        wait_log(svc, "SIGHUP: no [detection] egress_policy to re-read; nothing changed")
        assert svc.proc.poll() is None
        url = f"{svc.url}/v1/batches"
        assert post(url, encode_batch("c1", 0, [connect(1, "pypi.org")]), "t0ken") == (
            200,
            {"ack": 0},
        )
        assert svc.stop() == 0
