"""Summaries: median and spread of repeated runs, percentiles of latency samples."""
from __future__ import annotations

import statistics


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def latency_ms(samples_s: list[float], prefix: str = "latency") -> dict:
    """p50/p95/p99/max in milliseconds of latency samples given in seconds."""
    values = sorted(s * 1000 for s in samples_s)
    out = {f"{prefix}_{name}_ms": round(quantile(values, q), 3)
           for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}
    out[f"{prefix}_max_ms"] = round(values[-1], 3) if values else float("nan")
    return out


def summarize(values: list[float]) -> dict:
    """Median, min, max and interquartile range of one metric over the repetitions."""
    values = sorted(values)
    return {"median": statistics.median(values), "min": values[0], "max": values[-1],
            "q1": quantile(values, 0.25), "q3": quantile(values, 0.75), "n": len(values)}


def higher_is_better(metric: str) -> bool:
    """Throughputs (…_per_s) are better high; latencies, memory and sizes better low."""
    return metric.endswith("_per_s")
