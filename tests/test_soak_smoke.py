"""The soak (``python -m benchmarks.soak``) runs end to end for a few seconds with a few clients,
high fault and disconnect rates, and reports no lost turn and no leak.

The real soak (minutes, RSS over time) is not part of the test suite; see docs/soak.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(60)
def test_short_soak_loses_no_turn_and_leaks_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.soak",
            "--clients",
            "3",
            "--duration",
            "5",
            "--disconnect-rate",
            "0.1",
            "--fault-rate",
            "0.3",
            "--seed",
            "7",
            "--settle",
            "5",
            "--json",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert out.exists(), completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(out.read_text())
    details = json.dumps(
        {k: report[k] for k in ("lost", "leak_gauges", "unexpected_samples")}, indent=1
    )
    assert report["turns_lost_among_stayers"] == 0, details
    assert report["leaks"] == 0, details
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    # The run did what a soak does: turns, injected faults answered with errors, disconnects.
    assert report["turns_done"] > 0
    assert report["turns_error"] > 0
    assert report["turns_disconnected"] > 0
    assert set(report["by_fault"]) - {"none"}
    assert all(value == 0 for value in report["leak_gauges"].values())
    assert report["samples"] and report["samples"][0]["rss_mib"] > 0
    assert report["rss"]["flat"] is None  # too short for an RSS verdict
