"""The benchmark suite runs end to end in a tiny configuration and reports every scenario.

Numbers are not checked (a few tenths of a second of load mean nothing); the shape is: every
target, every scenario, a summary with ratios against the direct baseline, and the document.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TARGETS = ("direct", "inproc-http", "pooled-ws", "http-tunnel")


@pytest.mark.timeout(60)
def test_quick_run_reports_every_scenario(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "run",
            "--quick",
            "--no-plot",
            "--out",
            str(tmp_path),
            "--doc",
            str(doc),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())

    assert {run["target"] for run in results["runs"]} == set(TARGETS)
    settings = results["settings"]
    for run in results["runs"]:
        name = run["target"]
        sequential = run["sequential"]
        assert sequential["turns"] == settings["seq_turns"], name
        assert sequential["errors"] == 0, name
        assert sequential["events_per_turn"] == settings["events"], name
        assert sequential["ttfe_ms"]["p50"] > 0 and sequential["turn_ms"]["p99"] > 0, name
        for n in settings["connections"]:
            phase = run["concurrent"][str(n)]
            assert phase["connections"] == n and phase["turns"] > 0 and phase["errors"] == 0, name
            assert phase["cpu_s_per_1k_events"]["server"] is not None, name
        for n in settings["idle_counts"]:
            held = run["idle"]["held"][str(n)]
            assert held["connections"] == n, name
            assert held["rss_kib_per_connection"] is not None, name
        assert run["idle"]["idle_rss_mib"] > 0, name
        assert run["reuse"]["reuse"]["turns"] == settings["reuse_turns"] - 1, name
        if name != "inproc-http":  # an HTTP upstream has no socket to keep or drop
            assert run["reuse"]["no_reuse"]["turns"] == settings["reuse_turns"] - 1, name

    summary = results["summary"]
    for name in TARGETS:
        assert summary["ratio_vs_direct"][name]["seq_ttfe_p50_ms"] is not None
    assert summary["ratio_vs_direct"]["direct"]["seq_ttfe_p50_ms"] == pytest.approx(1.0)
    assert {check["target"] for check in summary["targets"]} >= {"pooled-ws"}
    text = doc.read_text()
    assert "ratios vs direct" in text and "--quick" in text
