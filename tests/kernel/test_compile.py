"""Every program file in bpf/ is a compilation unit of its own: it includes every header it
uses, so it compiles alone, and sandtrace.bpf.c may list the program files in any order.
Headers include what they use as well.

Each unit is compiled by BCC with the flags the loader uses, and every program in it is
loaded, so the verifier checks it too (BCC loads and attaches tracepoint programs as it
compiles; cgroup socket programs are loaded here, never attached).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from api.resources import shipped
from probes import kernel, loader
from probes.loader import ProbeConfig, build_source, compile_flags, load_socket_hook

BPF_DIR = shipped(loader.__file__, "bpf")
PROGRAM_FILES = sorted(p.name for p in BPF_DIR.glob("*.bpf.c") if p.name != loader.MAIN_SOURCE)
HEADERS = sorted(p.name for p in (BPF_DIR / "include").glob("*.h"))
FEATURE_FILES: dict[str, Callable[[kernel.KernelFeatures], bool]] = {
    "packet_socket.bpf.c": lambda features: features.packet_kprobe,
}
"""Program files whose every program needs a kernel feature (a kprobe on packet_create)."""
CONFIGS = {
    "ring": ProbeConfig(),
    "perf": ProbeConfig(perf_buffer=True),
    "trace_all": ProbeConfig(trace_all=True),
    "enforce": ProbeConfig(enforce=True),
}


def compile_and_load(source: str, config: ProbeConfig) -> list[str]:
    """Compile `source` as the loader would, load every program in it; their names."""
    from bcc import BPF, lib  # noqa: PLC0415 - kernel tests only

    features = kernel.check()
    bpf: Any = BPF(text=source.encode(), cflags=compile_flags(config, features))
    try:
        names = [
            lib.bpf_function_name(bpf.module, i).decode()
            for i in range(lib.bpf_num_functions(bpf.module))
        ]
        for name in names:
            if name in loader.SOCKET_HOOKS or name in loader.OPTIONAL_SOCKET_HOOKS:
                load_socket_hook(bpf, name, features)
        return names
    finally:
        bpf.cleanup()


def test_the_main_unit_is_every_program_file() -> None:
    main = (BPF_DIR / loader.MAIN_SOURCE).read_text()
    included = re.findall(r'^#include "([\w.]+)"', main, flags=re.MULTILINE)
    assert sorted(included) == PROGRAM_FILES


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("program_file", PROGRAM_FILES)
def test_each_program_file_compiles_and_loads_alone(program_file: str, config: str) -> None:
    names = compile_and_load(build_source(main=program_file), CONFIGS[config])
    if program_file in FEATURE_FILES and not FEATURE_FILES[program_file](kernel.check()):
        # its programs exist only where the kernel has what they attach to: the file must
        # still compile (above), to nothing
        assert names == [], f"{program_file} made programs on a kernel without their hook"
    else:
        assert names, f"{program_file} has no programs"


@pytest.mark.parametrize("header", HEADERS)
def test_each_header_compiles_alone(header: str, tmp_path: Path) -> None:
    """A header includes what it uses too, so a program file may include it first."""
    bpf_dir = tmp_path / "bpf"
    shutil.copytree(BPF_DIR, bpf_dir)
    (bpf_dir / "only.bpf.c").write_text(f'#include "{header}"\n')
    assert compile_and_load(build_source(bpf_dir, "only.bpf.c"), ProbeConfig()) == []


def test_program_files_compile_in_any_order(tmp_path: Path) -> None:
    bpf_dir = tmp_path / "bpf"
    shutil.copytree(BPF_DIR, bpf_dir)
    everything: set[str] | None = None
    # Every rotation of the list and of its reverse: each file comes first, last, and after
    # each of its neighbours either way (all permutations of 7 files would be 5040 builds).
    n = len(PROGRAM_FILES)
    orders = [
        files[i:] + files[:i] for files in (PROGRAM_FILES, PROGRAM_FILES[::-1]) for i in range(n)
    ]
    for order in orders:
        (bpf_dir / "order.bpf.c").write_text("".join(f'#include "{f}"\n' for f in order))
        names = set(compile_and_load(build_source(bpf_dir, "order.bpf.c"), ProbeConfig()))
        assert everything is None or names == everything, order
        everything = names
    assert everything is not None
    assert set(loader.SOCKET_HOOKS) <= everything
    # This kernel (6.18) has every optional hook: CI fails, not skips, when one is missing.
    assert set(loader.OPTIONAL_SOCKET_HOOKS) <= everything
