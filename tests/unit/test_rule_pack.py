"""The built-in rule pack: every rule loads, carries its metadata, and passes its cases."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import yaml

from detect.engine import Engine
from detect.loader import load_paths
from detect.ruleset import Correlation, Rule, RuleSet
from detect.testing import Case, load_cases

RULES = Path(__file__).resolve().parents[2] / "rules"


@functools.cache
def pack() -> RuleSet:
    """Parsed once: each case gets a fresh engine over the same compiled rules."""
    return load_paths([RULES])


def all_cases() -> list[Case]:
    return [c for f in sorted((RULES / "tests").glob("*.yml")) for c in load_cases(f)]


def test_every_rule_loads() -> None:
    rules = pack()
    assert rules.refused == []
    assert len(rules.rules) >= 20


def test_every_rule_has_metadata_and_cases() -> None:
    rules = pack()
    cases = all_cases()
    entries: list[Rule | Correlation] = [*rules.rules, *rules.correlations]
    for r in entries:
        where = f"{r.title} ({r.id})"
        assert r.level in {"informational", "low", "medium", "high", "critical"}, where
        assert r.description, where
        assert any(t.startswith("attack.") for t in r.tags), where
        if r.id not in Engine(rules).silent:
            mine = [c for c in cases if c.rule == r.id]
            assert any(c.fire for c in mine), f"{where}: no case that must fire"
            assert any(not c.fire for c in mine), f"{where}: no near-miss case"
    for r in rules.rules:
        assert r.falsepositives, f"{r.title}: no false-positive notes"


# Name selections that need no identity alternative: the interactive-shell building block
# has its own selection for renamed shells, and sshuttle is a Python script (TargetImage).
NAME_ONLY = {
    ("revshell_interactive_shell_exec", "named_shell"),
    ("tunnel_other_tools", "sshuttle_program"),
}


def test_every_name_rule_matches_identity_too() -> None:
    """A selection that names programs by Image|endswith (any event: exec, connect, bind,
    listen) names them by OriginalFileName too, so a renamed copy is caught on every event."""
    missing = []
    for path in sorted(RULES.glob("*.yml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or "detection" not in doc:
                continue
            for name, selection in doc["detection"].items():
                items: list[Any] = selection if isinstance(selection, list) else [selection]
                maps = [i for i in items if isinstance(i, dict)]
                names = [v for m in maps for k, v in m.items() if k == "Image|endswith"]
                identity = [
                    v for m in maps for k, v in m.items() if k == "OriginalFileName|endswith"
                ]
                if (doc["name"], name) in NAME_ONLY:
                    continue
                missing += [(doc["name"], name) for v in names if v not in identity]
    assert missing == []


@pytest.mark.parametrize("case", all_cases(), ids=lambda c: f"{Path(c.source).stem}: {c.name}")
def test_case(case: Case) -> None:
    engine = Engine(pack())
    fired = {a.rule_id for e in case.events for a in engine.feed(e)}
    assert (case.rule in fired) == case.fire, f"fired: {sorted(fired)}"


def test_generated_matchers_agree_with_the_compiled_rules() -> None:
    """The engine's generated code (per category over a FieldDict, and per event type reading
    the event itself, rule index included) and the rules' closures say the same thing, for
    every case event (including fields that are absent or empty). Each side gets a fresh
    FieldDict, so none reads what another cached."""
    from detect.codegen import generate_matcher  # noqa: PLC0415
    from detect.fieldcache import FieldDict  # noqa: PLC0415
    from detect.fields import GETTERS, category_of, category_of_type  # noqa: PLC0415

    rules = pack()
    by_category: dict[str, list[Rule]] = {}
    for r in rules.rules:
        by_category.setdefault(r.category, []).append(r)
    matchers = {c: generate_matcher(rs) for c, rs in by_category.items()}
    typed = {
        t: generate_matcher(by_category[c], getters)
        for t, getters in GETTERS.items()
        if (c := category_of_type(t)) is not None
    }
    checked = 0
    for case in all_cases():
        for event in case.events:
            category = category_of(event)
            assert category is not None
            getters = GETTERS[type(event)]
            expected = [
                i
                for i, r in enumerate(by_category[category])
                if r.test(FieldDict(event=event, getters=getters))
            ]
            assert matchers[category](FieldDict(event=event, getters=getters)) == expected
            assert typed[type(event)](event) == expected, case.name
            checked += 1
    assert checked >= 250


def test_rule_index_agrees_on_variants_of_the_cases() -> None:
    """The guards that index rules must never hide a match: case events with their texts
    upper-cased, traded between events, emptied or swapped for non-UTF-8 bytes still get
    from the generated matchers exactly what the rules' closures say."""
    import random  # noqa: PLC0415

    import msgspec.structs  # noqa: PLC0415

    from api.events import Event, ExecEvent  # noqa: PLC0415
    from detect.codegen import generate_matcher  # noqa: PLC0415
    from detect.fieldcache import FieldDict  # noqa: PLC0415
    from detect.fields import GETTERS, category_of, category_of_type  # noqa: PLC0415

    rules = pack()
    by_category: dict[str, list[Rule]] = {}
    for r in rules.rules:
        by_category.setdefault(r.category, []).append(r)
    typed = {
        t: generate_matcher(by_category[c], getters)
        for t, getters in GETTERS.items()
        if (c := category_of_type(t)) is not None
    }
    events = [e for case in all_cases() for e in case.events if isinstance(e, Event)]
    exes = [e.process.exe for e in events] + [b"", b"/TMP/.X", b"/usr/bin/\xff\xfe"]
    argvs = [e.argv for e in events if isinstance(e, ExecEvent)] + [[], [b"\xc3"]]
    rng = random.Random(7)
    checked = 0
    for event in events:
        for _ in range(8):
            process = msgspec.structs.replace(event.process, exe=rng.choice(exes))
            variant = msgspec.structs.replace(event, process=process)
            if isinstance(variant, ExecEvent):
                argv = rng.choice(argvs)
                variant.argv = [a.upper() for a in argv] if rng.random() < 0.5 else argv
            if rng.random() < 0.3:
                variant.process.exe = variant.process.exe.upper()
            category = category_of(variant)
            assert category is not None
            getters = GETTERS[type(variant)]
            expected = [
                i
                for i, r in enumerate(by_category[category])
                if r.test(FieldDict(event=variant, getters=getters))
            ]
            assert typed[type(variant)](variant) == expected
            checked += 1
    assert checked >= 2000


def test_the_per_value_index_memo_agrees_when_full() -> None:
    """A typed matcher works out a path field's part of the index once per value and
    forgets every value at once when it holds _MEMO_SIZE of them: across more distinct
    executables than that, hostile ones among them after the memo was emptied, it still says
    what the rules' closures say."""
    import msgspec.structs  # noqa: PLC0415

    from api.events import ExecEvent  # noqa: PLC0415
    from detect.codegen import _MEMO_SIZE, generate_matcher  # noqa: PLC0415
    from detect.fieldcache import FieldDict  # noqa: PLC0415
    from detect.fields import GETTERS  # noqa: PLC0415

    rules = [r for r in pack().rules if r.category == "process_creation"]
    getters = GETTERS[ExecEvent]
    match = generate_matcher(rules, getters)
    hostile = [e for c in all_cases() for e in c.events if c.fire and isinstance(e, ExecEvent)]
    assert hostile
    fired = 0
    for n in range(_MEMO_SIZE * 2):
        base = hostile[n % len(hostile)]
        exe = base.process.exe if n % 7 == 0 else b"/opt/tool-%d/bin/x" % n
        event = msgspec.structs.replace(
            base, process=msgspec.structs.replace(base.process, exe=exe)
        )
        expected = [
            i for i, r in enumerate(rules) if r.test(FieldDict(event=event, getters=getters))
        ]
        assert match(event) == expected, exe
        fired += bool(expected)
    assert fired > 100  # hostile executables met the memo both before and after it emptied
    assert len(match.__globals__["M_Image"]) < _MEMO_SIZE * 2 * 6 // 7  # it did empty


def test_a_benign_agent_session_raises_nothing_at_medium_or_above() -> None:
    """An agent's ordinary day, streams and all, through the whole pack in one engine (so
    correlations see it together): installs from a local index and a wheel into a venv, builds,
    tests, git, the project's own scripts, local IPC and dev servers on loopback, encoding one-
    liners, ssh -V and an ssh session configured by file that forwards nothing."""
    from detect.testing import event_from_fields  # noqa: PLC0415

    work = {"CurrentDirectory": "/srv/app", "ParentImage": "/usr/bin/bash"}
    piped = {"Stdio": ["pipe", "pipe", "pipe"]}
    tty = {"Stdio": ["tty", "tty", "tty"]}
    session: list[tuple[str, dict[str, object]]] = [
        (
            "process_creation",
            {"Image": "/usr/bin/python3.12", "CommandLine": "python3 -m venv .venv", **tty},
        ),
        (
            "process_creation",
            {
                "Image": "/usr/bin/python3.12",
                "ExecFileName": "/srv/app/.venv/bin/pip",
                "CommandLine": "/srv/app/.venv/bin/python3 /srv/app/.venv/bin/pip install"
                " -i http://127.0.0.1:8080/simple ./dist/app-1.0-py3-none-any.whl",
                **piped,
            },
        ),
        (
            "network_connection",
            {
                "ProcessId": 6100,
                "Image": "/usr/bin/python3.12",
                "CommandLine": "/srv/app/.venv/bin/python3 /srv/app/.venv/bin/pip install",
                "DestinationIp": "127.0.0.1",
                "DestinationPort": 8080,
            },
        ),
        (
            "process_creation",
            {"Image": "/usr/bin/gcc-12", "CommandLine": "gcc -O2 -o build/app src/main.c", **piped},
        ),
        (
            "process_creation",
            {
                "Image": "/usr/lib/gcc/x86_64-linux-gnu/12/cc1",
                "CommandLine": "cc1 -quiet src/main.c -o /tmp/ccA1b2C3.s",
                **piped,
            },
        ),
        (
            "process_creation",
            {
                "Image": "/usr/bin/x86_64-linux-gnu-as",
                "CommandLine": "as -o /tmp/ccX9y8Z7.o /tmp/ccA1b2C3.s",
                **piped,
            },
        ),
        (
            "process_creation",
            {"Image": "/srv/app/build/app", "CommandLine": "./build/app --selftest", **piped},
        ),
        (
            "process_creation",
            {
                "Image": "/usr/bin/python3.12",
                "ExecFileName": "/srv/app/.venv/bin/pytest",
                "CommandLine": "/srv/app/.venv/bin/python3 /srv/app/.venv/bin/pytest -q",
                **piped,
            },
        ),
        (
            "process_creation",
            {"Image": "/usr/bin/git", "CommandLine": "git commit -qm wip", **piped},
        ),
        (
            "process_creation",
            {
                "Image": "/usr/bin/dash",
                "ExecFileName": ".git/hooks/pre-commit",
                "CommandLine": "/bin/sh .git/hooks/pre-commit",
                **piped,
            },
        ),
        (
            "process_creation",
            {
                "Image": "/usr/bin/bash",
                "ExecFileName": "./scripts/build.sh",
                "CommandLine": "/bin/bash ./scripts/build.sh",
                **piped,
            },
        ),
        (
            "process_creation",
            {"Image": "/usr/bin/bash", "CommandLine": "bash ./run_tests.sh", **tty},
        ),
        (
            "process_creation",
            {
                "Image": "/usr/bin/python3.12",
                "Argv": ["python3", "-c", 'import base64; print(base64.b64encode(b"x"))'],
                **piped,
            },
        ),
        (
            "process_creation",
            {
                "Image": "/usr/bin/python3.12",
                "CommandLine": "python3 manage.py runserver 127.0.0.1:8000",
                "Stdio": ["null", "file:/srv/app/server.log", "file:/srv/app/server.log"],
            },
        ),
        (
            "network_listen",
            {
                "Image": "/usr/bin/python3.12",
                "CommandLine": "python3 manage.py runserver 127.0.0.1:8000",
                "LocalIp": "127.0.0.1",
                "LocalPort": 8000,
            },
        ),
        (
            "network_connection",
            {
                "Image": "/usr/bin/curl",
                "CommandLine": "curl -s http://127.0.0.1:8000/health",
                "DestinationIp": "127.0.0.1",
                "DestinationPort": 8000,
            },
        ),
        (
            "process_creation",
            {
                "Image": "/usr/bin/node",
                "CommandLine": "node server.js --stdio",
                "Stdio": ["unix:/run/user/1000/lsp.sock", "unix:/run/user/1000/lsp.sock", "pipe"],
            },
        ),
        ("process_creation", {"Image": "/usr/bin/ssh", "CommandLine": "ssh -V", **piped}),
        (
            "process_creation",
            {
                "ProcessId": 6200,
                "Image": "/usr/bin/ssh",
                "CommandLine": "ssh -F ./cfg build-host make",
                **piped,
            },
        ),
        (
            "network_connection",
            {
                "ProcessId": 6200,
                "Image": "/usr/bin/ssh",
                "CommandLine": "ssh -F ./cfg build-host make",
                "DestinationIp": "198.51.100.1",
                "DestinationPort": 22,
            },
        ),
        (
            "process_creation",
            {"Image": "/usr/bin/bash", "Argv": ["bash", "-c", "make -j4 && ./build/app"], **piped},
        ),
    ]
    engine = Engine(pack())
    raised = []
    for at, (category, fields) in enumerate(session):
        event = event_from_fields(category, {**work, **fields}, at=float(at))
        raised += [a for a in engine.feed(event) if a.level in {"medium", "high", "critical"}]
    raised += [a for a in engine.flush() if a.level in {"medium", "high", "critical"}]
    assert [(a.title, a.level) for a in raised] == []
