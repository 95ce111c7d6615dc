from __future__ import annotations

from collections.abc import Iterator

import pytest

from collector import cgroups
from probes import kernel
from probes.loader import ProbeConfig, Probes
from tests.kernel.tracer import Tracer


@pytest.fixture(scope="session")
def tracer() -> Iterator[Tracer]:
    probes = Probes(ProbeConfig(), kernel.check())
    try:
        yield Tracer(probes, cgroups.find_cgroup2_root())
    finally:
        probes.close()
