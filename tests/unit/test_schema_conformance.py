"""Every document sandtrace's ECS and OCSF schemas make, checked against the official schema
definitions (cut from elastic/ecs and ocsf/ocsf-schema into tests/data, see its README).

ECS: every field is an ECS field of the declared version (or under ``sandtrace.*``, the
custom namespace), of its type (keyword, long, ip, date, boolean, ...), an array where ECS
normalises to one, its value one ECS allows (event.kind, category, type, outcome; event.type
among those its category expects), and ``ecs.version`` and ``@timestamp`` present. OCSF:
every attribute is one of its class or object (recursively, by object type), of its type,
required attributes and at_least_one constraints met, enum values valid with their sibling
captions, type_uid = class_uid * 100 + activity_id, no deprecated attribute, and the profile
of every profile attribute declared in metadata.profiles. Mutation tests show the checks
catch a wrong field.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import pytest

from api.events import EVENT_TYPES, Alert, ConnectEvent, Event, ExecEvent, LostEvent
from api.ids import uuid7
from service.schemas.common import Doc, Item
from service.schemas.ecs import ECS_VERSION, ecs
from service.schemas.ocsf import OCSF_VERSION, ocsf
from tests.unit.test_schemas import (
    ALL_ITEMS,
    T0,
    alert,
    common,
    connect_event,
    exec_event,
    process,
)

DATA = Path(__file__).parent.parent / "data"
# The cuts, read when first used (tests/data/cut_schemas.py imports this module to make them).
ECS_DEF: dict[str, Any] = {}
OCSF_DEF: dict[str, Any] = {}


def load_definitions() -> None:
    """Read the cuts (once)."""
    if not ECS_DEF:
        ECS_DEF.update(json.loads((DATA / "ecs" / f"ecs-{ECS_VERSION}.json").read_text()))
        OCSF_DEF.update(json.loads((DATA / "ocsf" / f"ocsf-{OCSF_VERSION}.json").read_text()))
        _CLASSES.update({c["class_uid"]: c for c in OCSF_DEF["classes"].values()})


CUSTOM_NAMESPACE = "sandtrace"  # what ECS has no field for (see service/schemas/ecs.py)


def _many_events_alert() -> Alert:
    """A correlation alert: several triggering events of different kinds, some left out."""
    events: list[Any] = [
        exec_event(argv=[b"sh", b"-c", b"a\\xffb", b"a\xffb"]),
        connect_event(dport=22),
        connect_event(dport=23, outcome="error", errno=111, errno_name="ECONNREFUSED"),
        connect_event(
            family="ipv6", daddr="2001:db8::1", saddr="::", sport=0, outcome="in_progress"
        ),
    ]
    return alert(
        events=events,
        alert_id=uuid7(T0),
        tags=["attack.discovery", "attack.t1046", "attack.lateral-movement", "attack.t1021.004"],
        count=40,
        omitted=36,
    )


def _repeat_summary() -> Alert:
    return alert(
        alert_id=uuid7(T0 + 10**9),
        repeat=True,
        folds=uuid7(T0),
        count=17,
        events=[connect_event(), connect_event(dport=3334)],
        omitted=15,
    )


ITEMS: list[Item] = [
    *ALL_ITEMS,
    # connects and a unix connect refused in the kernel by the egress policy (--enforce)
    ConnectEvent(
        **common(),
        protocol="tcp",
        family="ipv4",
        daddr="203.0.113.9",
        dport=443,
        saddr="0.0.0.0",
        sport=0,
        outcome="denied",
        errno=1,
        errno_name="EPERM",
        denied=True,
    ),
    ConnectEvent(
        **common(),
        protocol="udp",
        family="ipv4",
        daddr="203.0.113.9",
        dport=53,
        outcome="repeated",
        repeats=40,
        denied=True,
    ),
    ConnectEvent(
        **common(),
        protocol="unix",
        family="unix",
        path=b"/run/docker.sock",
        outcome="denied",
        errno=1,
        errno_name="EPERM",
        denied=True,
    ),
    # a connect from an unbound socket: no source known
    ConnectEvent(
        **common(),
        protocol="tcp",
        family="ipv4",
        daddr="203.0.113.9",
        dport=80,
        saddr="0.0.0.0",
        sport=0,
        outcome="in_progress",
    ),
    ExecEvent(**common(process=process(argv=[b"a\\xffb"])), argv=[b"a\xffb", b"\\"]),
    _many_events_alert(),
    _repeat_summary(),
]


def ecs_documents() -> list[Doc]:
    return [ecs(item) for item in ITEMS]


def ocsf_documents() -> list[Doc]:
    return [ocsf(item) for item in ITEMS]


@pytest.fixture(autouse=True, scope="module")
def _definitions() -> None:
    load_definitions()


def test_the_items_are_every_kind_of_document() -> None:
    kinds = {item.kind for item in ITEMS}
    assert kinds == set(EVENT_TYPES)
    alerts = [i for i in ITEMS if isinstance(i, Alert)]
    assert any(a.repeat and a.folds for a in alerts)
    assert any(len(a.events) > 1 and a.omitted for a in alerts)
    assert any(isinstance(i, LostEvent) for i in ITEMS)


# --- ECS ---------------------------------------------------------------------------------------

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_ECS_SCALARS: dict[str, Any] = {
    **dict.fromkeys(("keyword", "constant_keyword", "wildcard", "match_only_text", "text"), str),
    **dict.fromkeys(("long", "integer", "short", "byte", "unsigned_long"), int),
    **dict.fromkeys(("float", "half_float", "scaled_float", "double"), (int, float)),
    "boolean": bool,
}


def _ecs_value_problem(name: str, kind: str, value: Any) -> str | None:
    if kind in _ECS_SCALARS:
        want = _ECS_SCALARS[kind]
        if (isinstance(value, bool) and want is not bool) or not isinstance(value, want):
            return f"{name}: {value!r} is not of ECS type {kind}"
    elif kind == "date":
        if not (isinstance(value, str) and _RFC3339.match(value)):
            return f"{name}: {value!r} is not an ECS date"
    elif kind == "ip":
        try:
            ipaddress.ip_address(value)
        except (ValueError, TypeError):
            return f"{name}: {value!r} is not an ECS ip"
    elif kind in ("object", "flattened"):
        if not isinstance(value, dict):
            return f"{name}: {value!r} is not an object"
    elif kind == "nested":
        if not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
            return f"{name}: {value!r} is not a list of objects"
    else:
        return f"{name}: ECS type {kind} is not checked here"
    return None


def ecs_problems(doc: Doc) -> list[str]:
    """What in `doc` is not ECS (empty when it conforms)."""
    load_definitions()
    fields: dict[str, Any] = ECS_DEF["fields"]
    problems: list[str] = []

    def walk(value: Doc, prefix: str) -> None:
        for key, v in value.items():
            name = prefix + key
            if not prefix and key == CUSTOM_NAMESPACE:
                if not isinstance(v, dict):
                    problems.append(f"{name}: the custom namespace is not an object")
                continue
            spec = fields.get(name)
            if spec is None:
                if isinstance(v, dict) and any(f.startswith(name + ".") for f in fields):
                    walk(v, name + ".")
                elif name.split(".")[0] not in ECS_DEF["field_sets"]:
                    problems.append(f"{name}: field set not in the vendored cut (rerun it)")
                else:
                    problems.append(f"{name}: not an ECS {ECS_DEF['version']} field")
                continue
            nested = isinstance(v, list) and spec["type"] == "nested"
            if isinstance(v, list) != bool(spec.get("array")) and not nested:
                problems.append(f"{name}: {'an' if spec.get('array') else 'not an'} array in ECS")
            for item in v if isinstance(v, list) and spec["type"] != "nested" else [v]:
                if (p := _ecs_value_problem(name, spec["type"], item)) is not None:
                    problems.append(p)
                elif "allowed" in spec and item not in spec["allowed"]:
                    problems.append(f"{name}: {item!r} is not an allowed value")

    walk(doc, "")
    flat = _flatten(doc)
    problems += [
        f"{n}: required, missing" for n, s in fields.items() if s.get("required") and n not in flat
    ]
    categories = fields["event.category"]["allowed"]
    for category in flat.get("event.category", []):
        expected = categories.get(category, [])
        for t in flat.get("event.type", []):
            if expected and t not in expected:
                problems.append(f"event.type: {t!r} is not expected for category {category!r}")
    return problems


def _flatten(doc: Doc, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("item", ITEMS, ids=lambda i: i.kind)
def test_ecs_document_conforms(item: Item) -> None:
    doc = ecs(item)
    assert ecs_problems(doc) == []
    assert doc["ecs"] == {"version": ECS_DEF["version"]}


def test_the_ecs_cut_is_the_version_declared() -> None:
    assert ECS_DEF["version"] == ECS_VERSION
    assert ECS_DEF["source"]["ref"] == f"v{ECS_VERSION}"


def _ecs_alert_doc() -> Doc:
    return ecs(_many_events_alert())


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda d: d["process"].update(pidd=1), "process.pidd: not an ECS 9.4.0 field"),
        (lambda d: d["process"].update(pid="42"), "process.pid: '42' is not of ECS type long"),
        (lambda d: d["process"].update(pid=True), "process.pid: True is not of ECS type long"),
        (lambda d: d["event"].update(kind="alerts"), "event.kind: 'alerts' is not an allowed"),
        (lambda d: d["destination"].update(ip="nowhere"), "destination.ip: 'nowhere' is not"),
        (lambda d: d["threat"]["tactic"].update(name="Discovery"), "threat.tactic.name: an array"),
        (lambda d: d["event"].update(type=["creation"]), "event.type: 'creation' is not expected"),
        (lambda d: d.pop("ecs"), "ecs.version: required, missing"),
        (lambda d: d.update({"@timestamp": "yesterday"}), "@timestamp: 'yesterday' is not"),
        (lambda d: d.update(registry={"path": "x"}), "registry: field set not in the"),
        (lambda d: d["rule"].update(id=["r"]), "rule.id: not an array in ECS"),
    ],
)
def test_ecs_check_catches_a_wrong_field(mutate: Any, problem: str) -> None:
    doc = copy.deepcopy(_ecs_alert_doc())
    assert ecs_problems(doc) == []
    mutate(doc)
    problems = ecs_problems(doc)
    assert any(p.startswith(problem) for p in problems), problems


# --- OCSF --------------------------------------------------------------------------------------

_CLASSES: dict[int, Any] = {}  # the cut's classes by class_uid
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _base_type(name: str) -> str:
    types = OCSF_DEF["types"]
    while types[name]["base"] != name:
        name = types[name]["base"]
    return name


def _ocsf_scalar_problem(where: str, type_name: str, value: Any) -> str | None:
    base = _base_type(type_name)
    ok = {
        "string_t": isinstance(value, str),
        "integer_t": isinstance(value, int) and not isinstance(value, bool),
        "long_t": isinstance(value, int) and not isinstance(value, bool),
        "float_t": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean_t": isinstance(value, bool),
        "json_t": True,
    }.get(base)
    if ok is None:
        return f"{where}: type {type_name} is not checked here"
    if not ok:
        return f"{where}: {value!r} is not {type_name}"
    low_high = OCSF_DEF["types"][type_name].get("range")
    if low_high and not low_high[0] <= value <= low_high[1]:
        return f"{where}: {value!r} is out of the range of {type_name}"
    if type_name == "ip_t":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return f"{where}: {value!r} is not ip_t"
    if type_name == "uuid_t" and not _UUID.match(value):
        return f"{where}: {value!r} is not uuid_t"
    return None


def _check_entity(
    value: Any, entity: dict[str, Any], what: str, where: str, profiles: set[str]
) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: {value!r} is not an object ({what})"]
    attributes: dict[str, Any] = entity["attributes"]
    problems = [
        f"{where}{name}: required by {what}, missing"
        for name, spec in attributes.items()
        if spec["requirement"] == "required"
        and name not in value
        and spec.get("profile", None) in (None, *profiles)  # a profile's, when it is declared
    ]
    for name in entity.get("constraints", {}).get("at_least_one", []):
        if name in value:
            break
    else:
        if "at_least_one" in entity.get("constraints", {}):
            names = entity["constraints"]["at_least_one"]
            problems.append(f"{where or what}: {what} needs at least one of {names}")
    for key, v in value.items():
        spec = attributes.get(key)
        at = f"{where}{key}"
        if spec is None:
            problems.append(f"{at}: not an attribute of {what}")
            continue
        if spec.get("deprecated"):
            problems.append(f"{at}: deprecated in {what}")
        if spec.get("profile") and spec["profile"] not in profiles:
            problems.append(f"{at}: attribute of profile {spec['profile']}, not declared")
        if isinstance(v, list) != bool(spec.get("array")):
            problems.append(f"{at}: {'an' if spec.get('array') else 'not an'} array in OCSF")
            continue
        for i, item in enumerate(v if isinstance(v, list) else [v]):
            item_at = f"{at}[{i}]" if isinstance(v, list) else at
            if spec["kind"] == "object":
                if spec["type"] == "object":  # free-form (unmapped)
                    if not isinstance(item, dict):
                        problems.append(f"{item_at}: {item!r} is not an object")
                elif spec["type"] not in OCSF_DEF["objects"]:
                    problems.append(f"{item_at}: object {spec['type']} not in the cut (rerun it)")
                else:
                    problems += _check_entity(
                        item, OCSF_DEF["objects"][spec["type"]], spec["type"], item_at + ".",
                        profiles,
                    )  # fmt: skip
                continue
            if (p := _ocsf_scalar_problem(item_at, spec["type"], item)) is not None:
                problems.append(p)
                continue
            if "enum" in spec:
                if str(item) not in spec["enum"]:
                    problems.append(f"{item_at}: {item!r} is not a value of its enum")
                elif (  # the caption, but for Other, whose sibling names the source's own
                    spec.get("sibling") in value
                    and not re.search(r"(^|: )Other$", spec["enum"][str(item)])
                    and value[spec["sibling"]] != spec["enum"][str(item)]
                ):
                    problems.append(
                        f"{where}{spec['sibling']}: {value[spec['sibling']]!r} is not the "
                        f"caption of {key} {item} ({spec['enum'][str(item)]!r})"
                    )
    return problems


def ocsf_problems(doc: Doc) -> list[str]:
    """What in `doc` is not OCSF (empty when it conforms)."""
    load_definitions()
    klass = _CLASSES.get(doc.get("class_uid"))  # type: ignore[arg-type]
    if klass is None:
        return [f"class_uid: {doc.get('class_uid')!r} is not a class in the cut"]
    problems: list[str] = []
    if doc.get("type_uid") != klass["class_uid"] * 100 + doc.get("activity_id", -1):
        problems.append(f"type_uid: {doc.get('type_uid')!r} is not class_uid * 100 + activity_id")
    if doc.get("category_uid") != klass["category_uid"]:
        problems.append(f"category_uid: {doc.get('category_uid')!r} is not the class's")
    if doc.get("class_name") != klass["caption"]:
        problems.append(f"class_name: {doc.get('class_name')!r} is not {klass['caption']!r}")
    if doc.get("category_name") != klass["category_caption"]:
        problems.append(f"category_name: {doc.get('category_name')!r} is not the category's")
    profiles = set(doc.get("metadata", {}).get("profiles", []))
    return problems + _check_entity(doc, klass, klass["caption"], "", profiles)


@pytest.mark.parametrize("item", ITEMS, ids=lambda i: i.kind)
def test_ocsf_document_conforms(item: Item) -> None:
    doc = ocsf(item)
    assert ocsf_problems(doc) == []
    assert doc["metadata"]["version"] == OCSF_DEF["version"]


def test_the_ocsf_cut_is_the_version_declared() -> None:
    assert OCSF_DEF["version"] == OCSF_VERSION


def _ocsf_connect_doc() -> Doc:
    return ocsf(connect_event())


@pytest.mark.parametrize(
    ("make", "mutate", "problem"),
    [
        (
            _ocsf_connect_doc,
            lambda d: d["src_endpoint"].update(address="198.51.100.2"),
            "src_endpoint.address: not an attribute of network_endpoint",
        ),
        (
            _ocsf_connect_doc,
            lambda d: d["metadata"].pop("profiles"),
            "actor: attribute of profile host, not declared",
        ),
        (
            _ocsf_connect_doc,
            lambda d: d["metadata"].update(profiles=["host"]),
            "actor.process.namespace_pid: attribute of profile container",
        ),
        (_ocsf_connect_doc, lambda d: d.update(activity_id=42), "activity_id: 42 is not a value"),
        (_ocsf_connect_doc, lambda d: d.update(type_uid=400102), "type_uid: 400102 is not"),
        (_ocsf_connect_doc, lambda d: d.update(severity_id=7), "severity_id: 7 is not a value"),
        (_ocsf_connect_doc, lambda d: d.update(activity_name="Close"), "activity_name: 'Close'"),
        (_ocsf_connect_doc, lambda d: d.update(time="now"), "time: 'now' is not timestamp_t"),
        (_ocsf_connect_doc, lambda d: d["dst_endpoint"].update(port=70000), "dst_endpoint.port"),
        (_ocsf_connect_doc, lambda d: d.pop("metadata"), "metadata: required by Network"),
        (
            lambda: ocsf(_many_events_alert()),
            lambda d: d["finding_info"].pop("uid"),
            "finding_info.uid: required by finding_info",
        ),
        (
            lambda: ocsf(_many_events_alert()),
            lambda d: d["evidences"][0].update(argv=["x"]),
            "evidences[0].argv: not an attribute of evidences",
        ),
        (
            lambda: ocsf(_many_events_alert()),
            lambda d: d["finding_info"]["attacks"][0]["technique"].update(uid=1046),
            "finding_info.attacks[0].technique.uid: 1046 is not string_t",
        ),
    ],
)
def test_ocsf_check_catches_a_wrong_field(make: Any, mutate: Any, problem: str) -> None:
    doc = copy.deepcopy(make())
    assert ocsf_problems(doc) == []
    mutate(doc)
    problems = ocsf_problems(doc)
    assert any(p.startswith(problem) for p in problems), problems


# --- what the documents say of alerts ------------------------------------------------------------


def test_a_repeat_summary_updates_the_finding_it_folds() -> None:
    summary = _repeat_summary()
    o = ocsf(summary)
    assert (o["activity_id"], o["activity_name"], o["type_uid"]) == (2, "Update", 200402)
    assert o["finding_info"]["uid"] == summary.folds
    assert o["metadata"]["uid"] == summary.alert_id
    assert "created_time" not in o["finding_info"]
    assert o["unmapped"]["sandtrace"]["folds"] == summary.folds
    first = ocsf(alert(alert_id=summary.folds))
    assert (first["activity_id"], first["finding_info"]["uid"]) == (1, summary.folds)
    assert first["metadata"]["uid"] == summary.folds
    e = ecs(summary)
    assert e["event"]["id"] == summary.alert_id
    assert e["sandtrace"]["alert"]["folds"] == summary.folds
    assert e["sandtrace"]["alert"]["repeat"] is True


def test_an_alert_carries_its_events_and_how_many_it_left_out() -> None:
    a = _many_events_alert()
    o = ocsf(a)
    assert [ev["name"] for ev in o["evidences"]] == ["exec", "connect", "connect", "connect"]
    assert o["evidences"][1]["dst_endpoint"] == {"ip": "203.0.113.10", "port": 22}
    assert "src_endpoint" not in o["evidences"][3]  # from an unbound socket
    assert o["unmapped"]["sandtrace"]["omitted"] == 36
    assert o["finding_info"]["related_events_count"] == 40
    e = ecs(a)
    summaries = e["sandtrace"]["alert"]["events"]
    assert [(s["kind"], s.get("destination", {}).get("port")) for s in summaries] == [
        ("exec", None),
        ("connect", 22),
        ("connect", 23),
        ("connect", 3333),
    ]
    assert summaries[2]["outcome"] == "failure"
    assert summaries[0]["process"]["args"] == ["sh", "-c", "a\\\\xffb", "a\\xffb"]
    assert "source" not in summaries[3]
    assert e["sandtrace"]["alert"]["omitted"] == 36
    assert e["sandtrace"]["alert"]["count"] == 40


def test_threat_names_tactics_and_techniques() -> None:
    e = ecs(_many_events_alert())
    assert e["threat"] == {
        "framework": "MITRE ATT&CK",
        "tactic": {
            "id": ["TA0007", "TA0008"],
            "name": ["Discovery", "Lateral Movement"],
            "reference": [
                "https://attack.mitre.org/tactics/TA0007/",
                "https://attack.mitre.org/tactics/TA0008/",
            ],
        },
        "technique": {
            "id": ["T1046", "T1021"],
            "name": ["Network Service Discovery", "Remote Services"],
            "reference": [
                "https://attack.mitre.org/techniques/T1046/",
                "https://attack.mitre.org/techniques/T1021/",
            ],
            "subtechnique": {
                "id": ["T1021.004"],
                "name": ["SSH"],
                "reference": ["https://attack.mitre.org/techniques/T1021/004/"],
            },
        },
    }
    attacks = ocsf(_many_events_alert())["finding_info"]["attacks"]
    assert [
        tuple(a.get(k, {}).get("uid") for k in ("tactic", "technique", "sub_technique"))
        for a in attacks
    ] == [
        (None, "T1046", None),
        (None, "T1021", "T1021.004"),
        ("TA0007", None, None),
        ("TA0008", None, None),
    ]  # fmt: skip
    one_tactic = ocsf(alert(tags=["attack.execution", "attack.t1059.004"]))
    assert one_tactic["finding_info"]["attacks"] == [
        {
            "technique": {
                "uid": "T1059",
                "name": "Command and Scripting Interpreter",
                "src_url": "https://attack.mitre.org/techniques/T1059/",
            },
            "sub_technique": {
                "uid": "T1059.004",
                "name": "Unix Shell",
                "src_url": "https://attack.mitre.org/techniques/T1059/004/",
            },
            "tactic": {
                "uid": "TA0002",
                "name": "Execution",
                "src_url": "https://attack.mitre.org/tactics/TA0002/",
            },
        }
    ]
    assert one_tactic["finding_info"]["types"] == ["Execution"]


def test_an_unbound_source_is_left_out() -> None:
    unbound = ConnectEvent(
        **common(), protocol="tcp", family="ipv4", daddr="203.0.113.9", dport=80,
        saddr="0.0.0.0", sport=0, outcome="in_progress",
    )  # fmt: skip
    assert "source" not in ecs(unbound)
    assert "src_endpoint" not in ocsf(unbound)
    assert ecs(unbound)["destination"] == {
        "ip": "203.0.113.9",
        "address": "203.0.113.9",
        "port": 80,
    }
    bound = ecs(connect_event())
    assert bound["source"] == {"ip": "198.51.100.2", "address": "198.51.100.2", "port": 40000}
    assert ocsf(connect_event())["src_endpoint"] == {"ip": "198.51.100.2", "port": 40000}


def test_every_event_document_says_it_is_an_event() -> None:
    for item in ITEMS:
        if isinstance(item, Event):
            assert ecs(item)["event"]["kind"] == "event"
