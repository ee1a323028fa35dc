"""Small helpers shared by the benchmarks: percentiles and result printing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[idx]


def report(results: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(results, indent=2, sort_keys=True))
        return
    print(title)
    width = max(len(k) for k in results)
    for key, value in results.items():
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {shown}")
