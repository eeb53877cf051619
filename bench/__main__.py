"""`make bench`: run every benchmark, each measuring kfeed against a baseline in the same run.

Each benchmark prints a one-line JSON summary last; they are collected into
bench/results/latest.json (not committed) and summarised here. docs/PERFORMANCE.md records them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = (
    "bench.bench_list_snapshots",
    "bench.bench_snapshot_insert",
    "bench.bench_fanout",
    "bench.bench_replay",
    "bench.bench_stream_scale",
    "bench.bench_backtest",
    "bench.bench_backtest_service",
    "bench.bench_ingest",
    "bench.bench_replicas",
    "bench.bench_export",
    "bench.bench_web_stream",
    "bench.bench_dashboard",
)
RESULTS = Path(__file__).parent / "results" / "latest.json"


def run(module: str) -> dict[str, object]:
    print(f"== {module}", flush=True)
    completed = subprocess.run(
        [sys.executable, "-m", module], capture_output=True, text=True, check=False
    )
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        print(completed.stdout + completed.stderr, file=sys.stderr)
        return {"benchmark": module, "error": f"exit status {completed.returncode}"}
    summary: dict[str, object] = {"benchmark": module, **json.loads(lines[-1])}
    print(json.dumps(summary, indent=2, sort_keys=True), flush=True)
    return summary


def main() -> None:
    selected = sys.argv[1:] or list(BENCHMARKS)
    summaries = [run(module if "." in module else f"bench.{module}") for module in selected]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(summaries, indent=2, sort_keys=True) + "\n")
    failed = [s["benchmark"] for s in summaries if s.get("error") or not s.get("meets_target")]
    print(f"\nresults in {RESULTS}; below target or failed: {failed or 'none'}")


if __name__ == "__main__":
    main()
