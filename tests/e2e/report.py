"""Time from syscall to alert per incident scenario, printed at the end of the e2e run."""

from __future__ import annotations

LATENCIES: dict[str, list[float]] = {}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def lines() -> list[str]:
    if not LATENCIES:
        return []
    out = [f"{'scenario':<34} {'alerts':>6} {'p50 ms':>8} {'p99 ms':>8}"]
    for name in sorted(LATENCIES):
        lat = LATENCIES[name]
        out.append(
            f"{name:<34} {len(lat):>6} {percentile(lat, 0.5) * 1e3:>8.1f} "
            f"{percentile(lat, 0.99) * 1e3:>8.1f}"
        )
    return out
