"""Cut the ECS and OCSF definitions sandtrace's documents use out of the official schemas.

    python tests/data/cut_schemas.py ECS_GIT_DIR OCSF_GIT_DIR

ECS_GIT_DIR is a git directory of github.com/elastic/ecs, OCSF_GIT_DIR one of
github.com/ocsf/ocsf-schema; the definitions are read at the tag and commit named below
(ECS_REF, OCSF_REF) with ``git show``, and written to tests/data/ecs/ecs-<version>.json and
tests/data/ocsf/ocsf-<version>.json in a compact form of our own (types, requirements,
enums, profiles; no descriptions). What is cut: for ECS, every field of each top-level field
set a document of tests/unit/test_schema_conformance.py uses; for OCSF, the four event
classes sandtrace emits, resolved (``extends`` chains, ``$include``d profiles), and every
object type reachable through the attributes those documents hold, each with all its
attributes. Rerun it after changing what the schemas emit (the conformance test fails on a
field set or object that is not in the cut, naming it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ECS_REF = "v9.4.0"
OCSF_REF = "3dcb905d26523ce4d5d0ba3c28c8507e2c859407"  # "v1.8.0 prep": version.json 1.8.0
OCSF_CLASSES = (
    "process_activity",
    "network_activity",
    "dns_activity",
    "detection_finding",
    "application_error",
)
HERE = Path(__file__).parent


def show(git_dir: str, ref: str, path: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", git_dir, "show", f"{ref}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def commit_of(git_dir: str, ref: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", git_dir, "rev-parse", f"{ref}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


# --- ECS ---------------------------------------------------------------------------------------


def cut_ecs(git_dir: str, field_sets: set[str]) -> dict[str, Any]:
    flat = yaml.safe_load(show(git_dir, ECS_REF, "generated/ecs/ecs_flat.yml"))
    fields: dict[str, Any] = {}
    for name, spec in sorted(flat.items()):
        if name.split(".")[0] not in field_sets:
            continue
        entry: dict[str, Any] = {"type": spec["type"]}
        if "array" in spec.get("normalize", []):
            entry["array"] = True
        if spec.get("required"):
            entry["required"] = True
        if "allowed_values" in spec:
            entry["allowed"] = {
                v["name"]: v.get("expected_event_types", []) for v in spec["allowed_values"]
            }
        fields[name] = entry
    return {
        "source": {
            "repository": "https://github.com/elastic/ecs",
            "ref": ECS_REF,
            "commit": commit_of(git_dir, ECS_REF),
            "file": "generated/ecs/ecs_flat.yml",
            "licence": "Apache-2.0",
        },
        "version": show(git_dir, ECS_REF, "version").strip(),
        "field_sets": sorted(field_sets),
        "fields": fields,
    }


# --- OCSF --------------------------------------------------------------------------------------


class Ocsf:
    """The OCSF schema source at one commit, resolved as its server compiles it: an entity's
    attributes are its parent's, then those of the profiles it includes, then its own (a key
    of its own overrides; ``"profile": null`` takes an attribute out of a profile)."""

    def __init__(self, git_dir: str) -> None:
        self.git_dir = git_dir
        self.dictionary = self.load("dictionary.json")
        self.categories = self.load("categories.json")["attributes"]
        self._by_name: dict[str, dict[str, Any]] = {}
        self.paths = subprocess.run(
            ["git", "--git-dir", git_dir, "ls-tree", "-r", "--name-only", OCSF_REF],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()

    def load(self, path: str) -> Any:
        return json.loads(show(self.git_dir, OCSF_REF, path))

    def find(self, folder: str, name: str) -> dict[str, Any]:
        key = f"{folder}/{name}"
        if not self._by_name:
            for path in self.paths:
                if path.split("/")[0] in ("events", "objects") and path.endswith(".json"):
                    d = self.load(path)
                    d["_path"] = path
                    self._by_name[f"{path.split('/')[0]}/{d['name']}"] = d
        return dict(self._by_name[key])

    def resolve(self, folder: str, name: str) -> dict[str, Any]:
        d = self.find(folder, name)
        parent_name = d.get("extends")
        if parent_name and parent_name != "object":
            parent = self.resolve(folder, parent_name)
            attributes = {k: dict(v) for k, v in parent["attributes"].items()}
            constraints = dict(parent.get("constraints", {}))
            profiles = list(parent.get("profiles", []))
            category = d.get("category", parent.get("category"))
        else:
            attributes, constraints, profiles = {}, {}, []
            category = d.get("category")
        own = dict(d.get("attributes", {}))
        for include in own.pop("$include", []):
            profile = self.load(include)
            pname = profile["name"] if profile.get("meta") == "profile" else None
            for k, v in profile["attributes"].items():
                attributes[k] = {**attributes.get(k, {}), **v, "profile": pname}
        for k, v in own.items():
            attributes[k] = {**attributes.get(k, {}), **v}
        constraints.update(d.get("constraints", {}))
        for p in d.get("profiles", []):
            if p not in profiles:
                profiles.append(p)
        return {
            "name": name,
            "uid": d.get("uid"),
            "caption": d.get("caption"),
            "category": category,
            "attributes": attributes,
            "constraints": constraints,
            "profiles": profiles,
            "file": d["_path"],
        }

    def attribute(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        base = self.dictionary["attributes"][name]
        type_name = spec.get("type", base["type"])
        out: dict[str, Any] = {"type": type_name}
        if type_name.endswith("_t"):
            out["kind"] = "scalar"
        else:
            out["kind"] = "object"
        if base.get("is_array"):
            out["array"] = True
        out["requirement"] = spec.get("requirement", "optional")
        if spec.get("profile"):
            out["profile"] = spec["profile"]
        enum = {**base.get("enum", {}), **spec.get("enum", {})}
        if enum:
            out["enum"] = {k: v.get("caption", "") for k, v in enum.items()}
        sibling = spec.get("sibling", base.get("sibling"))
        if sibling:
            out["sibling"] = sibling
        if "@deprecated" in spec or "@deprecated" in base:
            out["deprecated"] = True
        return out

    def entity(self, folder: str, name: str) -> dict[str, Any]:
        r = self.resolve(folder, name)
        out: dict[str, Any] = {
            "attributes": {k: self.attribute(k, v) for k, v in sorted(r["attributes"].items())},
            "file": r["file"],
        }
        if r["constraints"]:
            out["constraints"] = r["constraints"]
        if folder == "events":  # the uids the server fills in as it compiles a class
            category_uid = self.categories[r["category"]]["uid"]
            category_caption = self.categories[r["category"]]["caption"]
            class_uid = category_uid * 1000 + r["uid"]
            attributes = out["attributes"]
            attributes["category_uid"]["enum"] = {str(category_uid): category_caption}
            attributes["class_uid"]["enum"] = {str(class_uid): r["caption"]}
            attributes["type_uid"]["enum"] = {
                str(class_uid * 100 + int(a)): f"{r['caption']}: {caption}"
                for a, caption in attributes["activity_id"]["enum"].items()
            }
            out |= {
                "caption": r["caption"],
                "category_uid": category_uid,
                "category_caption": self.categories[r["category"]]["caption"],
                "class_uid": category_uid * 1000 + r["uid"],
            }
        return out

    def types(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, t in self.dictionary["types"]["attributes"].items():
            entry = {"base": t.get("type", name)}
            if "range" in t:
                entry["range"] = t["range"]
            out[name] = entry
        return out


def cut_ocsf(git_dir: str, used_objects: set[str]) -> dict[str, Any]:
    schema = Ocsf(git_dir)
    return {
        "source": {
            "repository": "https://github.com/ocsf/ocsf-schema",
            "commit": OCSF_REF,
            "licence": "Apache-2.0",
        },
        "version": schema.load("version.json")["version"],
        "types": schema.types(),
        "classes": {c: schema.entity("events", c) for c in OCSF_CLASSES},
        "objects": {o: schema.entity("objects", o) for o in sorted(used_objects)},
    }


def ocsf_objects_used(git_dir: str, documents: list[dict[str, Any]]) -> set[str]:
    """The object types reachable through the attributes the documents hold."""
    schema = Ocsf(git_dir)
    resolved: dict[str, dict[str, Any]] = {}
    used: set[str] = set()

    def walk(value: Any, attributes: dict[str, Any]) -> None:
        for key, v in value.items():
            spec = attributes.get(key)
            if spec is None or key == "unmapped":
                continue
            t = spec.get("type", schema.dictionary["attributes"].get(key, {}).get("type", ""))
            if t.endswith("_t") or t == "":
                continue
            used.add(t)
            if t not in resolved:
                resolved[t] = schema.resolve("objects", t)
            for item in v if isinstance(v, list) else [v]:
                if isinstance(item, dict):
                    walk(item, resolved[t]["attributes"])

    classes = {schema.entity("events", c)["class_uid"]: c for c in OCSF_CLASSES}
    for doc in documents:
        walk(doc, schema.resolve("events", classes[doc["class_uid"]])["attributes"])
    return used


def main() -> int:
    ecs_dir, ocsf_dir = sys.argv[1:3]
    sys.path.insert(0, str(HERE.parent.parent))
    # the documents are the conformance test's: imported once the tree is on the path
    from tests.unit.test_schema_conformance import ecs_documents, ocsf_documents  # noqa: PLC0415

    field_sets = {name.split(".")[0] for doc in ecs_documents() for name in _flat_names(doc)}
    field_sets.discard("sandtrace")  # sandtrace's own namespace: not ECS
    ecs_cut = cut_ecs(ecs_dir, field_sets)
    (HERE / "ecs" / f"ecs-{ecs_cut['version']}.json").write_text(
        json.dumps(ecs_cut, indent=1, sort_keys=True) + "\n"
    )
    ocsf_cut = cut_ocsf(ocsf_dir, ocsf_objects_used(ocsf_dir, ocsf_documents()))
    (HERE / "ocsf" / f"ocsf-{ocsf_cut['version']}.json").write_text(
        json.dumps(ocsf_cut, indent=1, sort_keys=True) + "\n"
    )
    return 0


def _flat_names(doc: dict[str, Any], prefix: str = "") -> list[str]:
    names: list[str] = []
    for k, v in doc.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            names.extend(_flat_names(v, name + "."))
        else:
            names.append(name)
    return names


if __name__ == "__main__":
    sys.exit(main())
