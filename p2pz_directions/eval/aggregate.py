"""Mean ± std over images and seeds, and the winner per metric when several directions compete.

>>> summarize([{"a": 1.0}, {"a": 3.0}, {"a": None}], {"a": True})
{'a': {'mean': 2.0, 'std': 1.0, 'n': 2, 'higher_is_better': True}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, population std (ddof 0) and count of the values that are not None/NaN."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return None, None, 0
    m = math.fsum(xs) / len(xs)
    var = math.fsum((x - m) ** 2 for x in xs) / len(xs)
    return m, math.sqrt(var), len(xs)


def summarize(samples: Sequence[Mapping[str, Any]], higher: Mapping[str, bool]) -> dict[str, dict[str, Any]]:
    """``{metric: {mean, std, n, higher_is_better}}`` over ``samples`` (dicts metric -> value)."""
    out = {}
    for metric, hib in higher.items():
        m, s, n = mean_std([x.get(metric) for x in samples])
        out[metric] = {"mean": m, "std": s, "n": n, "higher_is_better": bool(hib)}
    return out


def winners(
    summaries: Mapping[str, Mapping[str, Mapping[str, Any]]], higher: Mapping[str, bool]
) -> dict[str, list[str]]:
    """``{metric: [best key, ...]}`` over ``summaries`` (``{key: {metric: summary}}``), ties kept;
    empty when fewer than two keys have a value for the metric."""
    out: dict[str, list[str]] = {}
    for metric, hib in higher.items():
        vals = {
            k: s[metric]["mean"] for k, s in summaries.items() if s.get(metric, {}).get("mean") is not None
        }
        if len(vals) < 2:
            continue
        best = max(vals.values()) if hib else min(vals.values())
        out[metric] = sorted(k for k, v in vals.items() if math.isclose(v, best, rel_tol=0, abs_tol=1e-12))
    return out


def fmt(summary: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``"0.812 ± 0.040"`` (or ``"-"`` when there is no value)."""
    if not summary or summary.get("mean") is None:
        return "-"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"
