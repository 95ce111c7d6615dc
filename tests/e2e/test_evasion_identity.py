"""Identity on network events: a renamed tool is named by what it is on its connects, not
only on its exec. Real programs in a sandbox, against real listeners on the outside host.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import NetNS
from tests.e2e.test_evasion import by_rule
from tests.e2e.test_incidents import Run, expect, sandtrace_run
from tests.e2e.testhosts import SshServer

SSH_NONSTANDARD_PORT = "ffd676f2-df56-4bc5-8178-fd869f8ed559"  # ssh_nonstandard_port
TUNNEL_TOOL_CONNECT = "ea000d05-6525-4462-a01e-412d55b6f8bc"  # tunnel_tool_connect
TUNNEL_CLOUDFLARED = "f74775c8-79b0-4bbf-83d4-6ba3a7205761"  # tunnel_cloudflared (exec)
TUNNEL_EDGE_PORT = "ee34439b-cb40-403e-93f1-c610fbe066d8"  # tunnel_service_port_connect

GO = shutil.which("go") or "/usr/bin/go"


def connects_of(run: Run, exe: Path) -> list[dict[str, Any]]:
    return [e for e in run.events if e["kind"] == "connect" and e["process"]["exe"] == str(exe)]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_renamed_ssh_is_named_by_identity_on_its_connect(
    testnet: NetNS, sshd: SshServer, work: Path
) -> None:
    # A copy of ssh under an innocent name opens a remote forward to the test sshd's second
    # port: the connect event itself says what the program is, so the network rule keyed on
    # 'Image|endswith: /ssh' names it.
    helper = work / "sync-agent"
    ssh = " ".join(["./sync-agent", *sshd.client_argv()[1:]])
    script = (
        f"cp /usr/bin/ssh {helper} && {ssh} -fN -p {sshd.alt_port} -R 18082:127.0.0.1:8000 "
        f"{sshd.alt_destination} && sleep 2"
    )
    run = sandtrace_run(testnet, script, work)
    assert run.returncode == 0, run.stderr
    out = [e for e in connects_of(run, helper) if e["dport"] == sshd.alt_port]
    assert out, [(e["process"]["exe"], e["dport"]) for e in run.events if e["kind"] == "connect"]
    for event in out:
        process = event["process"]
        assert process["original_exe"] == "/usr/bin/ssh", process
        assert process["sha256"] == sha256_of(Path("/usr/bin/ssh"))
        assert process["cwd"] == str(work)
        assert process["filename"] == "./sync-agent"
    alerts = expect(run, "renamed ssh, its connect", "tunnels")
    named = [
        a
        for a in alerts
        if a["rule_id"] == SSH_NONSTANDARD_PORT and a["process"]["exe"] == str(helper)
    ]
    assert named, sorted(a["title"] for a in alerts)
    assert named[0]["events"][0]["kind"] == "connect"


# A stand-in for cloudflared (its release binaries cannot be downloaded here): a Go program
# built from a module whose path is cloudflared's own, github.com/cloudflare/cloudflared,
# with its main package where cloudflared keeps it (cmd/cloudflared). What the collector
# reads - the build information Go embeds in every binary - is what the real one carries;
# what it does is only the first step of a tunnel, a TCP session to its edge (here a test
# listener on port 443 instead of Cloudflare's 7844, so only identity can name it).
STAND_IN = """\
package main

import (
	"fmt"
	"net"
	"os"
	"time"
)

func main() {
	edge := os.Getenv("TUNNEL_EDGE")
	conn, err := net.DialTimeout("tcp", edge, 5*time.Second)
	if err != nil {
		fmt.Fprintln(os.Stderr, "edge:", err)
		os.Exit(1)
	}
	fmt.Fprintf(conn, "tunnel %v\\n", os.Args[1:])
	time.Sleep(500 * time.Millisecond)
	conn.Close()
}
"""


@pytest.fixture(scope="module")
def cloudflared_stand_in(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in built offline (no module proxy, no dependencies)."""
    if not Path(GO).exists():
        pytest.fail(f"{GO} is missing: run 'sudo make setup' (it installs golang-go)")
    src = tmp_path_factory.mktemp("cloudflared-src")
    (src / "go.mod").write_text("module github.com/cloudflare/cloudflared\n\ngo 1.19\n")
    (src / "cmd" / "cloudflared").mkdir(parents=True)
    (src / "cmd" / "cloudflared" / "main.go").write_text(STAND_IN)
    out = src / "bin" / "cloudflared"
    env = {
        **os.environ,
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",
        "GOCACHE": str(src / ".cache"),
        "GOPATH": str(src / ".gopath"),
        "CGO_ENABLED": "0",
    }
    subprocess.run(
        [GO, "build", "-o", str(out), "./cmd/cloudflared"],
        cwd=src,
        env=env,
        check=True,
        capture_output=True,
    )
    return out


def test_cloudflared_renamed_behind_a_wrapper_script_is_named_by_its_go_module(
    testnet: NetNS, work: Path, cloudflared_stand_in: Path
) -> None:
    # Atomic Red Team T1572 #7 in spirit: cloudflared run as a tunnel from a wrapper script,
    # here under innocent names for both (the binary 'agentd', the script 'start-services').
    (work / "bin").mkdir()
    agent = work / "bin" / "agentd"
    shutil.copy2(cloudflared_stand_in, agent)
    script = work / "start-services"
    script.write_text(
        "#!/bin/sh\n"
        f"export TUNNEL_EDGE={testnet.outside_addr}:443\n"
        "exec ./bin/agentd tunnel --no-autoupdate --url http://127.0.0.1:8000\n"
    )
    script.chmod(0o755)
    catcher = testnet.shell_catcher(443, "", hangup_s=1)
    try:
        run = sandtrace_run(testnet, "./start-services", work)
    finally:
        catcher.kill()
        catcher.wait()
    assert run.returncode == 0, run.stderr
    [started] = [e for e in run.events if e["kind"] == "exec" and e["process"]["exe"] == str(agent)]
    assert started["go_module"] == "github.com/cloudflare/cloudflared"
    [wrapper] = [
        e for e in run.events if e["kind"] == "exec" and e["filename"] == "./start-services"
    ]
    assert wrapper["process"]["exe"].endswith("sh")  # the kernel ran the #! script's shell...
    assert started["process"]["pid"] == wrapper["process"]["pid"]  # ...which became agentd
    out = [e for e in connects_of(run, agent) if e["dport"] == 443]
    assert out and all(e["process"]["go_module"] == started["go_module"] for e in out)
    alerts = expect(run, "cloudflared stand-in behind a wrapper", "tunnel_tools")
    by_identity = [
        a for a in by_rule(run, TUNNEL_TOOL_CONNECT) if a["events"][0]["kind"] == "connect"
    ]
    assert {a["process"]["exe"] for a in by_identity} == {str(agent)}, alerts
    assert by_rule(run, TUNNEL_CLOUDFLARED)  # its exec, by the same identity
    assert by_rule(run, TUNNEL_EDGE_PORT) == []  # not the edge port: identity alone
