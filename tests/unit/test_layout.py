"""The Python record mirrors match bpf/include/events.h, checked with the host C compiler."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from collector import records

ROOT = Path(__file__).resolve().parents[2]
STRUCTS = ["record_header", *records.BODY_FIELDS]


def _c_program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#define SANDTRACE_HOST_BUILD 1",
        '#include "events.h"',
        "int main(void) {",
    ]
    for name in STRUCTS:
        lines.append(f'printf("{name} sizeof %zu\\n", sizeof(struct {name}));')
        own = records.HEADER_FIELDS if name == "record_header" else records.BODY_FIELDS[name]
        for field, _ in own:
            lines.append(f'printf("{name} {field} %zu\\n", offsetof(struct {name}, {field}));')
    lines += ['printf("version %d\\n", SANDTRACE_LAYOUT_VERSION);', "return 0; }"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a host C compiler (cc) is needed to check the record layout"
    d = tmp_path_factory.mktemp("layout")
    src = d / "layout.c"
    src.write_text(_c_program())
    exe = d / "layout"
    subprocess.run(
        [cc, "-Wall", "-Werror", "-I", str(ROOT / "bpf/include"), str(src), "-o", str(exe)],
        check=True,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    result: dict[str, int] = {}
    for line in out.splitlines():
        *key, value = line.split()
        result[" ".join(key)] = int(value)
    return result


def test_layout_version_matches(c_layout: dict[str, int]) -> None:
    assert c_layout["version"] == records.LAYOUT_VERSION


@pytest.mark.parametrize("struct_name", STRUCTS)
def test_mirror_matches_c(c_layout: dict[str, int], struct_name: str) -> None:
    size, offsets = records.layout(struct_name)
    header_size, _ = records.layout("record_header")
    assert c_layout[f"{struct_name} sizeof"] == size
    assert size % 8 == 0
    own = (
        records.HEADER_FIELDS
        if struct_name == "record_header"
        else records.BODY_FIELDS[struct_name]
    )
    for field, _ in own:
        assert c_layout[f"{struct_name} {field}"] == offsets[field], f"{struct_name}.{field}"
    assert header_size == 80
