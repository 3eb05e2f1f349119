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
TARGETS = ("direct", "tcp-relay", "inproc-http", "pooled-ws", "http-tunnel")


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
        if name not in ("inproc-http", "tcp-relay"):  # no upstream socket to keep or drop
            assert run["reuse"]["no_reuse"]["turns"] == settings["reuse_turns"] - 1, name

    [direct] = [run for run in results["runs"] if run["target"] == "direct"]
    over_http = direct["sequential_http"]  # the fake upstream's own HTTP answer
    assert over_http["turns"] == settings["seq_turns"] and over_http["errors"] == 0
    assert over_http["ttfe_ms"]["p50"] > 0

    summary = results["summary"]
    for name in TARGETS:
        assert summary["ratio_vs_direct"][name]["seq_ttfe_p50_ms"] is not None
    assert summary["ratio_vs_direct"]["direct"]["seq_ttfe_p50_ms"] == pytest.approx(1.0)
    assert {check["target"] for check in summary["targets"]} >= {"pooled-ws"}
    text = doc.read_text()
    assert "ratios vs direct" in text and "--quick" in text


# --- the shared limits' targets (issue 15) ------------------------------------------------------


def test_keyed_targets_configure_a_key_with_limits_in_memory_or_in_redis(tmp_path: Path) -> None:
    from benchmarks.processes import KEY_LIMITS, KEY_NAME
    from benchmarks.runner import TARGETS, Runner, Settings
    from cch.config import load_config

    runner = Runner(None, Settings.quick_settings(), tmp_path)
    configs = {}
    for name, prefix in (
        ("pooled-ws", None),
        ("pooled-ws-limits", None),
        ("pooled-ws-cluster", "cchbench:abc:"),
    ):
        path = tmp_path / f"{name}.toml"
        path.write_text(runner.gateway_config(TARGETS[name], 4321, key_prefix=prefix))
        configs[name] = load_config(path, env={})

    assert configs["pooled-ws"].keys == () and not configs["pooled-ws"].cluster.enabled
    assert runner.client_config(TARGETS["pooled-ws"]).headers == {}
    for name in ("pooled-ws-limits", "pooled-ws-cluster"):
        config = configs[name]
        (key,) = config.keys
        assert (key.name, key.key) == (KEY_NAME, runner.key), name
        for field, value in KEY_LIMITS.items():
            assert getattr(key.limits, field) == value, (name, field)
        assert config.server.admin_token == runner.admin_token, name  # /metrics is read with it
        assert config.providers[0].base_url == "http://127.0.0.1:4321/v1", name
        assert config.providers[0].websocket == "on", name
        headers = runner.client_config(TARGETS[name]).headers
        assert headers == {"Authorization": f"Bearer {runner.key}"}, name
    assert not configs["pooled-ws-limits"].cluster.enabled
    cluster = configs["pooled-ws-cluster"].cluster
    assert cluster.redis == runner.s.redis_url and cluster.key_prefix == "cchbench:abc:"
    with pytest.raises(ValueError):  # a cluster gateway never shares another's keys
        runner.gateway_config(TARGETS["pooled-ws-cluster"], 4321)


def test_limits_check_fails_a_cluster_gateway_that_did_not_count_through_redis() -> None:
    from benchmarks.cluster import limits_check

    healthy = {
        "cch_turns_started_total": 100.0,
        'cch_key_refusals_total{key="bench",reason="x"}': 0.0,
        "cch_redis_up": 1.0,
        "cch_redis_commands_total": 300.0,
        'cch_redis_errors_total{kind="refused"}': 0.0,
        'cch_redis_errors_total{kind="unavailable"}': 0.0,
        "cch_cluster_redis_down": 0.0,
        'cch_cluster_fallbacks_total{mode="local"}': 0.0,
        "cch_cluster_redis_outages_total": 0.0,
        "cch_cluster_lease_renewal_failures_total": 0.0,
        "cch_cluster_owner_write_errors_total": 0.0,
    }
    check = limits_check(healthy, cluster=True)
    assert check["problems"] == [] and check["redis_commands_per_turn"] == 3.0

    def problems(**changed: float) -> list[str]:
        return limits_check({**healthy, **changed}, cluster=True)["problems"]

    assert problems(cch_redis_commands_total=150.0)  # fewer than admit + finish per turn
    assert problems(**{'cch_cluster_fallbacks_total{mode="local"}': 1.0})
    assert problems(**{'cch_redis_errors_total{kind="unavailable"}': 2.0})
    assert problems(cch_cluster_owner_write_errors_total=1.0)
    assert problems(cch_cluster_redis_down=1.0, cch_redis_up=0.0)
    assert problems(**{'cch_key_refusals_total{key="bench",reason="x"}': 1.0})
    no_redis = {k: v for k, v in healthy.items() if not k.startswith(("cch_redis", "cch_cluster"))}
    assert limits_check(no_redis, cluster=True)["problems"]
    assert limits_check(no_redis, cluster=False)["problems"] == []
    assert limits_check(healthy, cluster=False)["problems"]  # local limits never talk to Redis


def _keys_under(url: str, prefix: str) -> list[bytes]:
    """KEYS <prefix>* on the Redis at ``url`` (a test database: small)."""
    import socket

    from cch.cluster.redis import RedisAddress

    def command(*parts: str) -> bytes:
        out = f"*{len(parts)}\r\n".encode()
        for part in parts:
            out += f"${len(part.encode())}\r\n".encode() + part.encode() + b"\r\n"
        return out

    address = RedisAddress.from_url(url)
    with socket.create_connection((address.host, address.port), timeout=5) as sock:
        replies = sock.makefile("rb")
        setup = []
        if address.password is not None:
            setup.append(command("AUTH", *filter(None, [address.username]), address.password))
        setup.append(command("SELECT", str(address.db)))
        sock.sendall(b"".join(setup) + command("KEYS", prefix + "*"))
        for _ in setup:
            assert replies.readline().startswith(b"+OK")
        count = replies.readline()
        assert count.startswith(b"*"), count
        keys = []
        for _ in range(int(count[1:])):
            replies.readline()  # $<length>
            keys.append(replies.readline().rstrip(b"\r\n"))
        return keys


@pytest.mark.timeout(60)
def test_quick_cluster_run_counts_through_redis_and_leaves_no_keys(tmp_path: Path) -> None:
    from cch.cluster.testing import require_redis

    url = require_redis()
    doc = tmp_path / "benchmarks.md"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "run",
            "--quick",
            "--no-plot",
            "--targets",
            "pooled-ws-limits,pooled-ws-cluster",
            "--redis",
            url,
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

    assert {run["target"] for run in results["runs"]} == {
        "direct",
        "pooled-ws-limits",
        "pooled-ws-cluster",
    }
    for run in results["runs"]:
        if run["target"] == "direct":
            continue
        assert "failed" not in run, run["target"]
        for check in (run["limits_check"], run["reuse"]["no_reuse"]["limits_check"]):
            assert check["problems"] == [] and check["turns_started"] > 0, run["target"]
            if run["target"] == "pooled-ws-cluster":
                assert check["redis_commands_per_turn"] >= 2 and check["cluster_fallbacks"] == 0
            else:
                assert check["redis_commands"] is None
    cleaned = results["redis"]["cleaned"]
    assert len(cleaned) == 2 and all(count > 0 for count in cleaned.values())  # + the no-reuse one
    for prefix in cleaned:
        assert _keys_under(url, prefix) == [], prefix
    cost = results["summary"]["shared_limits"]
    assert cost["pairs"] == 1 and cost["difference"]["seq_ttfe_p50_ms"] is not None
    assert "## Shared limits through Redis" in doc.read_text()


def test_quick_deflate_run_shows_the_client_leg_compressed_and_the_upstream_leg_not(tmp_path: Path) -> None:
    out = tmp_path / "deflate.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.deflate",
            "--quick",
            "--variants",
            "off,edge-15",
            "--doc",
            "",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    median = json.loads(out.read_text())["summary"]["median"]
    off, edge = median["off"], median["edge-15"]
    # Codex-like turns repeat ~20 KB of instructions and tools: a 32 KiB window takes most away.
    assert edge["client_in_bytes_per_turn"] < 0.1 * off["client_in_bytes_per_turn"]
    assert edge["client_out_bytes_per_turn"] < 0.1 * off["client_out_bytes_per_turn"]
    # Compression on the client edge leaves the upstream leg as it was.
    assert abs(edge["upstream_in_bytes_per_turn"] - off["upstream_in_bytes_per_turn"]) < 0.01 * off["upstream_in_bytes_per_turn"]


def test_the_timed_gateway_finds_every_block_it_counts() -> None:
    # It wraps entry points by name: a renamed one must fail here, not in a benchmark run.
    completed = subprocess.run(
        [sys.executable, "-c", "from benchmarks.timed_gateway import _install, _ns; _install(); print(len(_ns))"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
