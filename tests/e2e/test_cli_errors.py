"""Every subcommand of the real `sandtrace` command, given bad input: a clear message that
starts with `sandtrace: ` (or argparse's usage error), a non-zero exit, and no traceback.
And the command's own face: --version, and one examples section in --help."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.serving import ROOT_DIR, free_port

# The subcommands this file gives bad input to; a subcommand --help lists that is not here
# still gets the generic cases of test_every_subcommand_refuses_what_it_does_not_know.
KNOWN = ("run", "watch", "serve", "tail")


def sandtrace(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandtrace", *args],
        capture_output=True,
        text=True,
        cwd=ROOT_DIR,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def subcommands() -> list[str]:
    out = sandtrace("--help").stdout
    found = re.search(r"\{([a-z,-]+)\}", out)
    assert found is not None, out
    return found[1].split(",")


def assert_clear_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    """Non-zero, no traceback, and a message that names what was wrong."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert any(ln.startswith(("sandtrace: ", "usage: ")) for ln in lines), result.stderr
    assert expected in result.stderr, result.stderr
    if "usage: " in result.stderr:
        assert result.returncode == 2


CLOSED = f"http://127.0.0.1:{free_port()}"
MISSING = "/nonexistent/sandtrace-test/file"

CASES: list[tuple[list[str], str]] = [
    # the top level
    ([], "the following arguments are required: command"),
    (["bogus"], "invalid choice: 'bogus'"),
    # run
    (["run"], "sandtrace: run: give a command after --"),
    (["run", "--width", "0", "--", "true"], "argument --width: want a line width of at least 1"),
    (["run", "--width", "-3", "--", "true"], "argument --width: want a line width of at least 1"),
    (["run", "--width", "wide", "--", "true"], "want a line width in columns"),
    (["run", "--ring-pages", "3", "--", "true"], "argument --ring-pages: want a power of two"),
    (["run", "--spool-max", "0", "--", "true"], "argument --spool-max: want a positive number"),
    (["run", "--server-linger", "0", "--", "true"], "want seconds above 0, at most 60"),
    (["run", "--server-linger", "soon", "--", "true"], "want a number, not 'soon'"),
    (["run", "--color", "pink", "--", "true"], "argument --color: invalid choice"),
    (["run", "--events", MISSING, "--", "true"], f"sandtrace: cannot open --events {MISSING}"),
    (["run", "--alerts", MISSING, "--", "true"], f"sandtrace: cannot open --alerts {MISSING}"),
    (
        ["run", "--command-output", MISSING, "--", "true"],
        f"sandtrace: cannot open --command-output {MISSING}",
    ),
    (["run", "--server", "ftp://x", "--", "true"], "sandtrace: --server: service URL 'ftp://x'"),
    (["run", "--server", "http://127.0.0.1:99999", "--", "true"], "has no valid port"),
    (["run", "--server", "http://192.0.2.1:8780", "--", "true"], "refusing to send events"),
    (
        ["run", "--server", CLOSED, "--server-token-file", MISSING, "--", "true"],
        f"sandtrace: --server-token-file: cannot read {MISSING}",
    ),
    (["run", "--rules", MISSING, "--", "true"], f"sandtrace: rules path {MISSING} does not exist"),
    (["run", "--egress-allow", "bo gus", "--", "true"], "egress allow-list entry 'bo gus'"),
    (["run", "--", MISSING], f"sandtrace: cannot start {MISSING}: No such file or directory"),
    # watch
    (["watch", "--cgroup", MISSING], f"sandtrace: watch --cgroup '{MISSING}': no such cgroup"),
    (["watch", "--cgroup", "../../etc"], "sandtrace: watch --cgroup '../../etc': no such cgroup"),
    (["watch", "--cgroup", "999999999"], "sandtrace: watch --cgroup '999999999': no such cgroup"),
    (["watch", "--pid", "0"], "argument --pid: want a process id (1 or more), not 0"),
    (["watch", "--pid", "me"], "argument --pid: want a number, not 'me'"),
    (["watch", "--pid", "99999999"], "sandtrace: watch --pid 99999999: no such process"),
    (["watch", "--width", "0"], "argument --width: want a line width of at least 1"),
    (
        ["watch", "--server", CLOSED, "--spool-dir", "/proc/sandtrace-spool"],
        "sandtrace: cannot use the spool directory /proc/sandtrace-spool",
    ),
    # serve
    (["serve", "--config", MISSING], f"sandtrace: configuration error: {MISSING}: cannot read"),
    (["serve", "--config", "/"], "sandtrace: configuration error: /: cannot read"),
    (["serve", "--listen", "nope"], "--listen: 'nope': expected HOST:PORT with a port 1-65535"),
    (["serve", "--listen", "127.0.0.1:99999"], "--listen: '127.0.0.1:99999': expected HOST:PORT"),
    (["serve", "--token-file", MISSING], f"--token-file: cannot read {MISSING}"),
    (["serve", "--rules", MISSING], f"--rules: {MISSING} does not exist"),
    (["serve", "--tls-cert", MISSING, "--tls-key", MISSING], f"cannot load {MISSING}"),
    # tail
    (["tail", "--width", "0"], "argument --width: want a line width of at least 1"),
    (["tail", "--server", "ftp://x"], "sandtrace: --server wants an http:// or https:// URL"),
    (["tail", "--server", "http://[::1"], "sandtrace: --server wants an http:// or https://"),
    (["tail", "--server", CLOSED, "--token-file", MISSING], f"--token-file: cannot read {MISSING}"),
    (["tail", "--token-file", MISSING], "sandtrace: --token-file, --ca-file and --insecure go"),
    (
        ["tail", "--server", "https://127.0.0.1:1", "--ca-file", MISSING],
        f"sandtrace: cannot load --ca-file {MISSING}",
    ),
    (["tail", "--kind", "bogus"], "sandtrace: unknown kind 'bogus'; known: bind,"),
    (["tail", "-o", "yaml"], "argument -o/--output: invalid choice: 'yaml'"),
]


@pytest.mark.parametrize(("args", "expected"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_gets_a_clear_error(args: list[str], expected: str) -> None:
    assert_clear_error(sandtrace(*args), expected)


def test_the_cases_cover_every_known_subcommand() -> None:
    covered = {args[0] for args, _ in CASES if args and args[0] in KNOWN}
    assert covered == set(KNOWN)
    assert set(KNOWN) <= set(subcommands())


@pytest.mark.parametrize("sub", subcommands())
def test_every_subcommand_refuses_what_it_does_not_know(sub: str) -> None:
    # what a subcommand needs besides options, so that the unknown option is what it refuses
    needs = {
        "rules": ["check", "rules"],
        "replay": ["events.jsonl"],
        "sandbox": ["thaw", "st-1"],
        "policy": ["suggest", "events.jsonl"],
    }.get(sub, [])
    assert_clear_error(sandtrace(sub, *needs, "--no-such-option"), "unrecognized arguments")
    result = sandtrace(sub, "--help")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert result.stdout.startswith(f"usage: sandtrace {sub}")


def test_serve_names_a_config_that_is_not_toml(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text("[server\nlisten = \n")
    assert_clear_error(
        sandtrace("serve", "--config", str(config)), f"{config}: not valid TOML: Expected ']'"
    )


def test_missing_bcc_names_the_package_to_install(tmp_path: Path) -> None:
    """On a Python without BCC, run says which package brings it, not an ImportError."""
    (tmp_path / "bcc.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'bcc'\", name='bcc')\n"
    )
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", str(ROOT_DIR))])
    result = sandtrace("run", "--", "true", env={"PYTHONPATH": path})
    assert_clear_error(result, "sandtrace: BCC's Python module cannot be imported")
    assert "apt-get install python3-bpfcc" in result.stderr
    assert result.returncode == 2


def test_version_is_the_package_s() -> None:
    result = sandtrace("--version")
    project = tomllib.loads((ROOT_DIR / "pyproject.toml").read_text())["project"]
    assert result.returncode == 0
    assert result.stdout == f"sandtrace {project['version']}\n"
    assert version("sandtrace") == project["version"]


def test_help_into_a_reader_that_went_away_is_no_error() -> None:
    """`sandtrace --help | head -1`, when head has gone before the help is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe fails: EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "sandtrace", "run", "--help"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT_DIR,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (0, "")


def test_help_shows_each_example_once_under_one_heading() -> None:
    out = sandtrace("--help").stdout
    epilog = out[out.index("\nexamples:\n") + 1 :]
    assert out.count("examples:") == 1
    lines = [ln.strip() for ln in epilog.splitlines()[1:] if ln.strip()]
    assert len(lines) == len(set(lines))  # none repeated
    commands = {
        m[1] for ln in lines if (m := re.match(r"(?:sudo )?sandtrace (\w+)", ln)) is not None
    }
    assert commands == set(subcommands())  # every subcommand has an example
