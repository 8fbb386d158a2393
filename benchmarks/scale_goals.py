"""The scale benchmark's goals (`benchmarks.scale`): its largest size against the reference size, each goal with
its value and whether it is met, from a run's lines or from results files (`--from`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHAIN = ("ingest", "encode", "build_index")
GOALS = {"seconds_per_passage_ratio": 1.25, "peak_rss_ratio": 1.25, "night_fraction": 0.03, "warm_start_s": 30}
P99_GOAL = 1.5


def goal(value: float, limit: float) -> dict[str, Any]:
    return {"value": round(value, 3), "goal": limit, "met": bool(value <= limit)}


def largest_process(line: dict[str, Any], job: str) -> float:
    """MiB of the job's largest process: its driver or a worker busy with it (idle workers left aside)."""
    part = line["night"] if job == "nightly" else line["compaction"] if job == "compact" else line[job]
    return max(mib for kind, mib in part["peak_rss_mib"].items() if kind != "ray::IDLE")


def seconds_a_passage(line: dict[str, Any], job: str) -> float:
    return line[job]["seconds"] / line["passages"]


def summary_line(largest: dict[str, Any], reference: dict[str, Any], clients: int) -> dict[str, Any]:
    """The largest size against the reference size: the issue's goals, each with its value and whether it is met."""
    goals = {}
    for job in CHAIN:
        ratio = seconds_a_passage(largest, job) / seconds_a_passage(reference, job)
        goals[f"{job}_seconds_per_passage_ratio"] = goal(ratio, GOALS["seconds_per_passage_ratio"])
    compacted = "failed" not in largest["compaction"] and "failed" not in reference["compaction"]
    for job in (*CHAIN, "nightly", "compact") if compacted else (*CHAIN, "nightly"):
        ratio = largest_process(largest, job) / largest_process(reference, job)
        goals[f"{job}_peak_rss_ratio"] = goal(ratio, GOALS["peak_rss_ratio"])
    goals["night_fraction"] = goal(largest["night"]["seconds_fraction"], GOALS["night_fraction"])
    goals["warm_start_s"] = goal(largest["replica"]["warm_start"]["first_answer_s"], GOALS["warm_start_s"])
    p99 = [line["replica"]["search"][f"dense_{clients}"]["p99_ms"] for line in (largest, reference)]
    goals[f"dense_p99_{clients}_clients_ratio"] = goal(p99[0] / p99[1], P99_GOAL)
    return {
        "benchmark": "scale-summary",
        "passages": largest["passages"],
        "reference": reference["passages"],
        "factory": largest["factory"],
        "goals": goals,
        "met": all(g["met"] for g in goals.values()),
    }


def saved_line(paths: list[Path], n: int) -> dict[str, Any]:
    """The last `scale` line at `n` passages in results files (JSON lines), read in the order given."""
    found = [
        line
        for path in paths
        for line in map(json.loads, filter(str.strip, path.read_text().splitlines()))
        if line.get("benchmark") == "scale" and line.get("passages") == n
    ]
    if not found:
        raise SystemExit(f"{', '.join(map(str, paths))}: no scale line at {n:,} passages")
    return found[-1]
