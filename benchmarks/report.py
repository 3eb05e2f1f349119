"""From raw runs to the summary (medians, ratios vs the direct baseline, targets), the plot and
docs/benchmarks.md. Everything here is a pure function of the results JSON, so
``python -m benchmarks report`` can regenerate the doc and the plot without re-running."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

BASELINE = "direct"
# The shared limits' cost (issue 15): the same key limits in memory and in Redis, same run.
LOCAL_LIMITS, SHARED_LIMITS = "pooled-ws-limits", "pooled-ws-cluster"


# --- metrics -----------------------------------------------------------------------------------


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def metrics_of(run: dict[str, Any], settings: dict[str, Any]) -> dict[str, float | None]:
    """The flat metrics of one target's run; names are stable keys of the summary."""
    m: dict[str, float | None] = {}
    for q in ("p50", "p95", "p99"):
        m[f"seq_ttfe_{q}_ms"] = _get(run, "sequential", "ttfe_ms", q)
        m[f"seq_turn_{q}_ms"] = _get(run, "sequential", "turn_ms", q)
    m["seq_http_ttfe_p50_ms"] = _get(run, "sequential_http", "ttfe_ms", "p50")  # direct only
    for n in settings["connections"]:
        c = _get(run, "concurrent", str(n)) or {}
        m[f"c{n}_turns_per_s"] = c.get("turns_per_s")
        m[f"c{n}_events_per_s"] = c.get("events_per_s")
        m[f"c{n}_turn_p50_ms"] = _get(c, "turn_ms", "p50")
        m[f"c{n}_turn_p99_ms"] = _get(c, "turn_ms", "p99")
        m[f"c{n}_cpu_s_per_1k_events"] = _get(c, "cpu_s_per_1k_events", "server")
        m[f"c{n}_upstream_cpu_s_per_1k_events"] = _get(c, "cpu_s_per_1k_events", "upstream")
        for role in ("server", "upstream", "client", "other_processes"):
            m[f"c{n}_{role}_cpu_util"] = _get(c, "cpu_utilization", role)
    # CPU per turn (ms) of the gateway and, for the cluster target, of the Redis server.
    for role in ("server", "redis"):
        m[f"seq_{role}_cpu_ms_per_turn"] = _per_turn(_get(run, "sequential"), role)
        for n in settings["connections"]:
            m[f"c{n}_{role}_cpu_ms_per_turn"] = _per_turn(_get(run, "concurrent", str(n)), role)
    for n in settings["connections"]:
        m[f"c{n}_redis_cpu_util"] = _get(run, "concurrent", str(n), "cpu_utilization", "redis")
    m["redis_commands_per_turn"] = _get(run, "limits_check", "redis_commands_per_turn")
    m["idle_rss_mib"] = _get(run, "idle", "idle_rss_mib")
    m["startup_rss_mib"] = run.get("startup_rss_mib")
    for n in settings["idle_counts"]:
        m[f"idle{n}_kib_per_conn"] = _get(run, "idle", "held", str(n), "rss_kib_per_connection")
        m[f"idle{n}_rss_mib"] = _get(run, "idle", "held", str(n), "rss_mib")
    for variant in ("reuse", "no_reuse"):
        m[f"{variant}_turn_mean_ms"] = _get(run, "reuse", variant, "turn_ms", "mean")
        m[f"{variant}_turn_p50_ms"] = _get(run, "reuse", variant, "turn_ms", "p50")
        m[f"{variant}_ttfe_p50_ms"] = _get(run, "reuse", variant, "ttfe_ms", "p50")
    return m


def _per_turn(phase: Any, role: str) -> float | None:
    """CPU milliseconds of ``role`` per turn of a phase."""
    cpu, turns = _get(phase, "cpu_seconds", role), _get(phase, "turns")
    return cpu / turns * 1000 if cpu is not None and turns else None


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Median (and min/max) over runs of every metric, per target; ratios vs the baseline.
    A run that failed its limits check (``failed``) measured something else: left out."""
    settings = results["settings"]
    per_target: dict[str, list[dict[str, float | None]]] = {}
    failed: dict[str, int] = {}
    for run in results["runs"]:
        if run.get("failed"):
            failed[run["target"]] = failed.get(run["target"], 0) + 1
            continue
        per_target.setdefault(run["target"], []).append(metrics_of(run, settings))
    medians: dict[str, dict[str, float | None]] = {}
    spread: dict[str, dict[str, list[float]]] = {}
    for target, rows in per_target.items():
        medians[target], spread[target] = {}, {}
        for key in rows[0]:
            values = [r[key] for r in rows if r.get(key) is not None]
            medians[target][key] = statistics.median(values) if values else None
            spread[target][key] = [min(values), max(values)] if values else []
    base = medians.get(BASELINE, {})
    ratios = {
        target: {
            key: (value / base[key] if value is not None and base.get(key) else None)
            for key, value in values.items()
        }
        for target, values in medians.items()
    }
    summary = {
        "runs_per_target": {t: len(rows) for t, rows in per_target.items()},
        "failed_runs": failed,
        "median": medians,
        "min_max": spread,
        "ratio_vs_direct": ratios,
        "shared_limits": shared_limits_cost(results),
    }
    summary["targets"] = evaluate_targets(summary, settings)
    return summary


def shared_limits_cost(results: dict[str, Any]) -> dict[str, Any] | None:
    """What keeping the key's limits in Redis costs: ``pooled-ws-cluster`` − ``pooled-ws-limits``
    within each run (the two ran back to back on the same machine state), the median (and
    min/max) of those differences in each metric's own unit; for throughput also the time per
    turn (1 / turns/s, µs) and cluster ÷ limits. None unless both ran (and passed) in a run."""
    settings = results["settings"]
    by_run: dict[int, dict[str, dict[str, float | None]]] = {}
    for run in results["runs"]:
        if run["target"] in (LOCAL_LIMITS, SHARED_LIMITS) and not run.get("failed"):
            by_run.setdefault(run["run"], {})[run["target"]] = metrics_of(run, settings)
    pairs = [(r[LOCAL_LIMITS], r[SHARED_LIMITS]) for r in by_run.values() if len(r) == 2]
    if not pairs:
        return None
    diffs: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        diffs.setdefault(key, []).append(value)

    for local, shared in pairs:
        for key, value in shared.items():
            if value is not None and local.get(key) is not None:
                add(key, value - local[key])  # type: ignore[operator]
        for n in settings["connections"]:
            lo, hi = local.get(f"c{n}_turns_per_s"), shared.get(f"c{n}_turns_per_s")
            if lo and hi:
                add(f"c{n}_us_per_turn", 1e6 / hi - 1e6 / lo)
                add(f"c{n}_turns_per_s_ratio", hi / lo)
    return {
        "pairs": len(pairs),
        "difference": {k: statistics.median(v) for k, v in diffs.items()},
        "difference_min_max": {k: [min(v), max(v)] for k, v in diffs.items()},
    }


TTFE_ADDED_MS = {"pooled-ws": 0.3, "inproc-http": 0.5, "http-tunnel": 0.5}
YARDSTICKS = ("tcp-relay",)  # targets measured but not judged
"""The time to first event a mode may add over direct (ms); other targets 0.5."""


def evaluate_targets(summary: dict[str, Any], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, judged on the medians."""
    med, ratio = summary["median"], summary["ratio_vs_direct"]
    base = med.get(BASELINE, {})
    checks: list[dict[str, Any]] = []

    def add(
        name: str, target: str, value: float | None, limit: float, higher_is_better: bool, unit: str
    ) -> None:
        if value is None:
            checks.append(
                {
                    "name": name,
                    "target": target,
                    "value": None,
                    "limit": limit,
                    "met": None,
                    "unit": unit,
                }
            )
            return
        met = value >= limit if higher_is_better else value <= limit
        margin = (value - limit) if higher_is_better else (limit - value)
        checks.append(
            {
                "name": name,
                "target": target,
                "value": value,
                "limit": limit,
                "met": met,
                "margin": margin,
                "unit": unit,
            }
        )

    # The relay is a yardstick (the floor of a second process), not a gateway with targets.
    gateways = [t for t in med if t not in (BASELINE, *YARDSTICKS)]
    # Issue 18 ("close to the wire"), measured with the usage ledger on (the default).
    if 16 in settings["connections"]:
        for t in gateways:
            if t in ("pooled-ws", "external"):
                add("turns/s at 16 connections vs direct", t, ratio[t].get("c16_turns_per_s"), 0.85, True, "× direct")
                add(
                    "gateway CPU per 1,000 events vs the fake upstream's (16 connections)",
                    t,
                    ratio[t].get("c16_cpu_s_per_1k_events"),
                    0.4,
                    False,
                    "× upstream",
                )
    for t in gateways:
        value = med[t].get("seq_ttfe_p50_ms")
        added = (
            value - base["seq_ttfe_p50_ms"]
            if value is not None and base.get("seq_ttfe_p50_ms") is not None
            else None
        )
        add("time to first event added, p50 (sequential)", t, added, TTFE_ADDED_MS.get(t, 0.5), False, "ms")
        if t == "inproc-http" and value is not None and base.get("seq_http_ttfe_p50_ms") is not None:
            # Apart from what HTTP costs the fake upstream itself (its own HTTP answer, in the
            # same run): what the gateway adds to an HTTP upstream's first event.
            add(
                "time to first event added over the upstream's own HTTP answer, p50 (sequential)",
                t,
                value - base["seq_http_ttfe_p50_ms"],
                TTFE_ADDED_MS.get(t, 0.5),
                False,
                "ms",
            )
    for t in gateways:
        # "No worse than today": c765cdd (before issue 18), pooled-ws medians of 2 runs on the
        # machine of this page's run (docs/benchmarks-history.md).
        if 5000 in settings["idle_counts"]:
            add("RSS per idle client connection at 5,000", t, med[t].get("idle5000_kib_per_conn"), 12.1, False, "KiB")
        add("idle gateway RSS", t, med[t].get("idle_rss_mib"), 62.9, False, "MiB")
    return checks


# --- formatting ---------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if 0 < abs(value) < 0.1:
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


# (key, label, lower is better?)
def table_rows(settings: dict[str, Any]) -> list[tuple[str, str, bool]]:
    rows: list[tuple[str, str, bool]] = [
        ("seq_ttfe_p50_ms", "sequential: time to first event p50 (ms)", True),
        ("seq_ttfe_p95_ms", "sequential: time to first event p95 (ms)", True),
        ("seq_ttfe_p99_ms", "sequential: time to first event p99 (ms)", True),
        ("seq_turn_p50_ms", "sequential: turn time p50 (ms)", True),
        ("seq_turn_p95_ms", "sequential: turn time p95 (ms)", True),
        ("seq_turn_p99_ms", "sequential: turn time p99 (ms)", True),
        ("seq_http_ttfe_p50_ms", "sequential over HTTP (the fake upstream's own answer): time to first event p50 (ms)", True),
    ]
    for n in settings["connections"]:
        rows += [
            (f"c{n}_turns_per_s", f"{n} connections: turns/s", False),
            (f"c{n}_events_per_s", f"{n} connections: events/s", False),
            (f"c{n}_turn_p50_ms", f"{n} connections: turn time p50 (ms)", True),
            (f"c{n}_cpu_s_per_1k_events", f"{n} connections: server CPU s per 1,000 events", True),
        ]
    rows.append(("idle_rss_mib", "idle server RSS (MiB)", True))
    for n in settings["idle_counts"]:
        rows.append(
            (f"idle{n}_kib_per_conn", f"{n:,} idle connections: RSS per connection (KiB)", True)
        )
    rows += [
        (
            "reuse_turn_mean_ms",
            f"turns 2..{settings['reuse_turns']}, socket reused: mean turn time (ms)",
            True,
        ),
        (
            "no_reuse_turn_mean_ms",
            f"turns 2..{settings['reuse_turns']}, no socket reuse: mean turn time (ms)",
            True,
        ),
    ]
    return rows


def markdown_tables(results: dict[str, Any], summary: dict[str, Any]) -> tuple[str, str]:
    settings = results["settings"]
    targets = list(results["targets"])
    gateways = [t for t in targets if t != BASELINE]
    med, ratio = summary["median"], summary["ratio_vs_direct"]
    head = "| metric | direct (absolute) | " + " | ".join(gateways) + " |\n"
    head += "|---|---:|" + "---:|" * len(gateways) + "\n"
    ratio_table = head
    for key, label, _lower in table_rows(settings):
        cells = [_ratio(ratio.get(t, {}).get(key)) for t in gateways]
        ratio_table += (
            f"| {label} | {_fmt(med.get(BASELINE, {}).get(key))} | " + " | ".join(cells) + " |\n"
        )
    spread = summary["min_max"]
    abs_table = "| metric | " + " | ".join(targets) + " |\n|---|" + "---:|" * len(targets) + "\n"

    def cell(t: str, key: str) -> str:
        value = med.get(t, {}).get(key)
        lo_hi = spread.get(t, {}).get(key) or []
        if value is None or len(lo_hi) != 2 or summary["runs_per_target"].get(t, 0) < 2:
            return _fmt(value)
        return f"{_fmt(value)} ({_fmt(lo_hi[0])}–{_fmt(lo_hi[1])})"

    for key, label, _lower in table_rows(settings):
        cells = [cell(t, key) for t in targets]
        abs_table += f"| {label} | " + " | ".join(cells) + " |\n"
    return ratio_table, abs_table


def utilization_table(results: dict[str, Any], summary: dict[str, Any]) -> str:
    settings = results["settings"]
    med = summary["median"]
    cores = results["machine"].get("cores") or 1
    out = (
        f"| target | connections | gateway | fake upstream | load client | benchmark total (of {cores} cores) "
        "| other programs |\n|---|---:|---:|---:|---:|---:|---:|\n"
    )

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{v * 100:.0f}%"

    for t in results["targets"]:
        for n in settings["connections"]:
            s, u, c, o = (
                med.get(t, {}).get(f"c{n}_{r}_cpu_util")
                for r in ("server", "upstream", "client", "other_processes")
            )
            if t == BASELINE:
                s = None  # the server is the upstream itself
            total = sum(v for v in (s, u, c) if v is not None)
            out += f"| {t} | {n} | {pct(s)} | {pct(u)} | {pct(c)} | {pct(total / cores)} | {pct(o)} |\n"
    return out


def limits_paragraph(results: dict[str, Any], summary: dict[str, Any]) -> str:
    """What the utilization table says, in words, from the medians of the first connection count."""
    n = results["settings"]["connections"][0]
    med = summary["median"]
    cores = results["machine"].get("cores") or 1

    def util(target: str, role: str) -> str:
        value = med.get(target, {}).get(f"c{n}_{role}_cpu_util")
        return "?" if value is None else f"{value * 100:.0f}%"

    gateway = next((t for t in ("pooled-ws", "external") if t in med), None)
    text = (
        f"The load client, the gateway and the fake upstream are single-threaded Python processes. "
        f"In the baseline at {n} connections the fake upstream runs at {util(BASELINE, 'upstream')} of a "
        f"core and the client at {util(BASELINE, 'client')}: **the baseline is limited by the fake "
        f"upstream's own CPU**, not by the client, so one load-client process is enough."
    )
    if gateway is not None:
        busy = {
            role: med.get(gateway, {}).get(f"c{n}_{role}_cpu_util") or 0.0
            for role in ("server", "upstream", "client")
        }
        gateway_busiest = busy["server"] >= max(busy.values())
        busiest = "the gateway is the busiest of the three" if gateway_busiest else (
            "the fake upstream is busier than the gateway"
        )
        text += (
            f" Through `{gateway}` the gateway runs at {util(gateway, 'server')}, the upstream at "
            f"{util(gateway, 'upstream')} and the client at {util(gateway, 'client')}: {busiest}. "
            f"None reaches 100% because three processes share {cores} cores and every turn passes "
            f"through all three in turn, so each waits for the others part of the time."
        )
    if gateway is None or gateway_busiest:
        text += (
            " The throughput ratios therefore measure how much CPU the gateway spends per event "
            "relative to what the fake upstream spends producing it, on a machine where CPU is the "
            "limit, not the network."
        )
    else:
        text += (
            " With the gateway no longer the busiest process, the throughput ratios measure how "
            "well the three processes interleave on the shared cores as much as the gateway's own "
            "cost; the row \"server CPU s per 1,000 events\" is the direct measure of that cost."
        )
    text += (
        " The fake upstream is not cheap per event (it builds each event as a dict, "
        "serialises it and decodes it again for its own bookkeeping) and the load client does the "
        "minimum (it decodes only terminal events): a faster upstream (C, Go) would make the "
        "baseline faster and every gateway ratio smaller; more cores would let the three processes "
        "run in parallel without contending. The last column is CPU used by other programs during "
        "the phase (the machine may be shared). Before each target the run waits (up to "
        f"{results['settings'].get('quiet_wait', 0):g} s) for other programs to go quiet, and a timed "
        "phase (sequential, throughput) during which they used more than "
        f"{results['settings'].get('quiet_cores', 0):g} cores is run again "
        f"(at most {results['settings'].get('noise_retries', 0)} time(s), within "
        f"{results['settings'].get('retry_budget', 0):g} s per run), keeping the less disturbed "
        f"attempt; {retried(results)}. The min/max of every metric over the runs is in the JSON "
        "(`summary.min_max`)."
    )
    return text


def retried(results: dict[str, Any]) -> str:
    phases = []
    for run in results["runs"]:
        phases.append(run.get("sequential"))
        phases.extend((run.get("concurrent") or {}).values())
    phases = [p for p in phases if isinstance(p, dict)]
    again = sum(1 for p in phases if p.get("attempts", 1) > 1)
    return f"{again} of {len(phases)} timed phases were run again in this run"


def targets_list(summary: dict[str, Any]) -> str:
    lines = []
    for check in summary["targets"]:
        value, limit, unit = check["value"], check["limit"], check["unit"]
        if value is None:
            lines.append(
                f"- **n/a** — {check['name']} ({check['target']}): not measured in this run"
            )
            continue
        op = "≥" if check["name"].startswith("turns/s") else "≤"
        verdict = "met" if check["met"] else "**missed**"
        if check["met"]:
            how = f"margin {abs(check['margin']):.2f} {unit}"
        else:
            how = f"short by {abs(check['margin']):.2f} {unit}"
        lines.append(
            f"- {verdict} — {check['name']} ({check['target']}): {_fmt(value)} {unit} (target {op} {_fmt(limit)} {unit}; {how})"
        )
    return "\n".join(lines)


def profile_section(profile: dict[str, Any] | None, top: int = 25) -> str:
    if not profile or not profile.get("cumulative"):
        return "_No profile in this run (`--no-profile`)._\n"
    load = profile["load"]
    out = (
        f"Gateway process (pooled upstream WS, in-process tunnel) under cProfile, "
        f"{load['connections']} connections for {load['seconds']:.1f} s: {load['turns']:,} turns, "
        f"{load['events']:,} forwarded events. The profiler runs only during the measured window "
        f"(`benchmarks/profiled_gateway.py`: started by SIGUSR2 after the warm-up turns, written on "
        f"SIGUSR1), so start-up and connection set-up are not in it. cProfile slows the process down: "
        f"compare entries with each other, not with the tables above. `calls/1k ev` is calls per "
        f"1,000 forwarded events.\n\n"
        "Top by cumulative time:\n\n"
        "| cumtime (s) | tottime (s) | calls | calls/1k ev | function |\n|---:|---:|---:|---:|---|\n"
    )
    for row in profile["cumulative"][:top]:
        out += (
            f"| {row['cumtime']:.2f} | {row['tottime']:.2f} | {row['ncalls']:,} | "
            f"{_fmt(row['calls_per_1k_events'], 0)} | `{row['function']}` |\n"
        )
    if profile.get("shares"):
        out += (
            "\nWhere the time goes, grouped (share of all profiled time in the gateway process; "
            "the groups do not overlap):\n\n| share | seconds | what |\n|---:|---:|---|\n"
        )
        for row in profile["shares"]:
            share = "–" if row["share"] is None else f"{row['share'] * 100:.1f}%"
            out += f"| {share} | {row['seconds']:.2f} | {row['what']} |\n"
    out += "\nTop by own time (tottime):\n\n"
    out += "| tottime (s) | cumtime (s) | calls | calls/1k ev | function |\n|---:|---:|---:|---:|---|\n"
    for row in profile["tottime"][:20]:
        out += (
            f"| {row['tottime']:.2f} | {row['cumtime']:.2f} | {row['ncalls']:,} | "
            f"{_fmt(row['calls_per_1k_events'], 0)} | `{row['function']}` |\n"
        )
    return out


# --- plot ----------------------------------------------------------------------------------------


def plot(results: dict[str, Any], summary: dict[str, Any], path: Path) -> bool:
    """Four panels of medians per target; False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    settings = results["settings"]
    targets = list(results["targets"])
    med = summary["median"]
    colors = ["#777777", "#1f77b4", "#2ca02c", "#d62728", "#9467bd"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))

    def bars(ax: Any, keys: list[tuple[str, str]], title: str, ylabel: str) -> None:
        width = 0.8 / len(targets)
        for i, t in enumerate(targets):
            raw = [med.get(t, {}).get(k) for k, _ in keys]
            values = [v or 0.0 for v in raw]
            xs = [j + (i - (len(targets) - 1) / 2) * width for j in range(len(keys))]
            rects = ax.bar(xs, values, width, label=t, color=colors[i % len(colors)])
            if t != BASELINE:
                base = [med.get(BASELINE, {}).get(k) for k, _ in keys]
                labels = [
                    "n/a" if v is None else (f"{v / b:.2f}×" if b else "")
                    for v, b in zip(raw, base, strict=True)
                ]
                ax.bar_label(rects, labels=labels, fontsize=7, rotation=90, padding=2)
        ax.set_xticks(range(len(keys)), [label for _, label in keys])
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.margins(y=0.2)

    bars(
        axes[0][0],
        [
            ("seq_ttfe_p50_ms", "TTFE p50"),
            ("seq_ttfe_p99_ms", "TTFE p99"),
            ("seq_turn_p50_ms", "turn p50"),
            ("seq_turn_p99_ms", "turn p99"),
        ],
        "Sequential turns on one connection",
        "ms (lower is better)",
    )
    bars(
        axes[0][1],
        [(f"c{n}_turns_per_s", f"{n} conns") for n in settings["connections"]],
        "Throughput",
        "turns/s (higher is better)",
    )
    bars(
        axes[1][0],
        [(f"c{n}_cpu_s_per_1k_events", f"{n} conns") for n in settings["connections"]],
        "Server CPU per 1,000 forwarded events",
        "CPU seconds (lower is better)",
    )
    bars(
        axes[1][1],
        [(f"idle{n}_kib_per_conn", f"{n:,} idle") for n in settings["idle_counts"]],
        "RSS per idle client connection",
        "KiB (lower is better)",
    )
    bars(
        axes[0][2],
        [("reuse_turn_mean_ms", "socket reused"), ("no_reuse_turn_mean_ms", "no reuse")],
        f"Turns 2..{settings['reuse_turns']}: mean turn time",
        "ms (lower is better)",
    )
    bars(
        axes[1][2],
        [
            ("idle_rss_mib", "idle"),
            *((f"idle{n}_rss_mib", f"{n:,} conns") for n in settings["idle_counts"]),
        ],
        "Server RSS",
        "MiB",
    )
    axes[0][0].legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(
        f"cch vs direct fake upstream — medians of {settings['runs']} runs, {m.get('cores')} cores "
        f"({m.get('cpu_model') or 'unknown CPU'}); labels: ratio vs direct; absolute numbers are machine-dependent",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- the document ---------------------------------------------------------------------------------

COMMAND = ".venv/bin/python -m benchmarks run"
SHARED_LIMITS_COMMAND = (
    f"{COMMAND} --targets {LOCAL_LIMITS},{SHARED_LIMITS} --runs 5 --no-profile --no-plot "
    "--out /tmp/bench-cluster --doc /tmp/bench-cluster/benchmarks.md"
)


def _us(ms: float | None) -> str:
    """A difference in milliseconds as signed µs (ms from 1 ms on)."""
    if ms is None:
        return "–"
    sign = "+" if ms >= 0 else "−"
    if abs(ms) >= 1:
        return f"{sign}{abs(ms):.2f} ms"
    return f"{sign}{abs(ms) * 1000:.0f} µs"


def shared_limits_rows(settings: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, label) of the shared-limits table: times and CPU per turn in ms."""
    rows = [
        ("seq_ttfe_p50_ms", "sequential: time to first event p50 (ms)"),
        ("seq_ttfe_p95_ms", "sequential: time to first event p95 (ms)"),
        ("seq_ttfe_p99_ms", "sequential: time to first event p99 (ms)"),
        ("seq_turn_p50_ms", "sequential: turn time p50 (ms)"),
        ("seq_server_cpu_ms_per_turn", "sequential: gateway CPU per turn (ms)"),
    ]
    for n in settings["connections"]:
        rows += [
            (f"c{n}_turns_per_s", f"{n} connections: turns/s"),
            (f"c{n}_turn_p50_ms", f"{n} connections: turn time p50 (ms)"),
            (f"c{n}_server_cpu_ms_per_turn", f"{n} connections: gateway CPU per turn (ms)"),
        ]
    return rows


def deflate_section() -> str:
    """permessage-deflate as last measured by ``python -m benchmarks.deflate`` (a run of its
    own: a default run does not include it), rendered from the JSON it keeps in
    benchmarks/deflate_results.json, so regenerating this document keeps it."""
    from benchmarks.deflate import recorded_section

    text = recorded_section()
    return f"{text}\n" if text else ""


def shared_limits_section(results: dict[str, Any], summary: dict[str, Any]) -> str:
    """The Redis cost measured in this run, or, when this run did not measure it, the one
    recorded in SHARED_LIMITS_RECORDED (with why, if the cluster target was skipped)."""
    cost = summary.get("shared_limits")
    skipped = (results.get("skipped") or {}).get(SHARED_LIMITS)
    note = f"_`{SHARED_LIMITS}` was skipped in this run: {skipped}._\n\n" if skipped else ""
    for target, count in (summary.get("failed_runs") or {}).items():
        if target in (LOCAL_LIMITS, SHARED_LIMITS):
            note += f"_`{target}`: {count} run(s) failed the limits check (see the JSON)._\n\n"
    if not cost:
        return note + SHARED_LIMITS_RECORDED
    settings, med, ratio = results["settings"], summary["median"], summary["ratio_vs_direct"]
    diff, spread = cost["difference"], cost["difference_min_max"]
    shared = med[SHARED_LIMITS]
    from benchmarks.processes import KEY_LIMITS

    limits = ", ".join(f"`{k} = {v:,}`" for k, v in KEY_LIMITS.items())
    redis_url = (results.get("redis") or {}).get("url") or settings.get("redis_url")
    per_turn = shared.get("redis_commands_per_turn")
    failed = summary.get("failed_runs", {})
    n_failed = failed.get(LOCAL_LIMITS, 0) + failed.get(SHARED_LIMITS, 0)
    code, m = code_line(results), results["machine"]
    load = m.get("loadavg_at_start")

    def spread_of(key: str, fmt: Callable[[float], str]) -> str:
        lo_hi = spread.get(key) or []
        if len(lo_hi) != 2 or cost["pairs"] < 2:
            return ""
        return f" ({fmt(lo_hi[0])} to {fmt(lo_hi[1])})"

    out = (
        f"`{LOCAL_LIMITS}` is `pooled-ws` with one client key whose limits count every turn "
        f"({limits}: never reached), kept in the gateway's memory; `{SHARED_LIMITS}` keeps the "
        f'same limits in Redis (`[cluster] redis = "{redis_url}"`, a `key_prefix` '
        "of its own for every gateway process, deleted after it stops). The limits take two Redis "
        "round trips a turn, each one Lua script: one admits the turn before its frame goes "
        "upstream (on the time-to-first-event path), one finishes it after its terminal event; "
        "whatever else `[cluster]` sends to Redis is part of the cost too: "
        f"{_fmt(per_turn)} commands per turn in all (`cch_redis_commands_total` ÷ "
        "`cch_turns_started_total`). Every keyed gateway's `/metrics` is read after its "
        "scenarios, and a run fails unless the key's limits refused nothing and, for the cluster "
        "target, the gateway counted through Redis (at least two commands per turn) with no "
        f"Redis error, outage or fallback ({n_failed} run(s) failed and are left out). Redis "
        f"runs on the same {m.get('cores')} cores as everything else; its CPU is read from "
        "`/proc` of its process (it may serve other clients too).\n\n"
        f"Medians of {cost['pairs']} runs (cch {code}, started {results['started_at']}, load "
        f"average at start {', '.join(f'{x:.2f}' for x in load) if load else 'unknown'}); the "
        "last column is the median over the runs of cluster − limits within the same run "
        "(min to max in parentheses):\n\n"
        f"| metric | direct | {LOCAL_LIMITS} | {SHARED_LIMITS} | Redis cost |\n"
        "|---|---:|---:|---:|---:|\n"
    )

    def cell(target: str, key: str) -> str:
        r = ratio.get(target, {}).get(key)
        return _fmt(med[target].get(key)) + ("" if r is None else f" ({r:.2f}×)")

    for key, label in shared_limits_rows(settings):
        base = med.get(BASELINE, {}).get(key)
        if key.endswith("_turns_per_s"):
            n = key[1:].split("_", 1)[0]
            r, us = diff.get(f"c{n}_turns_per_s_ratio"), diff.get(f"c{n}_us_per_turn")
            what = "–"
            if r is not None and us is not None:
                what = f"{r:.2f}× limits = {_us(us / 1000)} per turn"
                what += spread_of(f"c{n}_us_per_turn", lambda v: _us(v / 1000))
        else:
            what = _us(diff.get(key)) + spread_of(key, _us)
        out += (
            f"| {label} | {_fmt(base)} | {cell(LOCAL_LIMITS, key)} | "
            f"{cell(SHARED_LIMITS, key)} | {what} |\n"
        )
    out += (
        "| sequential: Redis server CPU per turn (ms) | – | – | "
        f"{_fmt(shared.get('seq_redis_cpu_ms_per_turn'))} | |\n"
    )
    for n in settings["connections"]:
        util = shared.get(f"c{n}_redis_cpu_util")
        out += (
            f"| {n} connections: Redis server CPU per turn (ms) | – | – | "
            f"{_fmt(shared.get(f'c{n}_redis_cpu_ms_per_turn'))} "
            f"({'–' if util is None else f'{util * 100:.0f}% of a core'}) | |\n"
        )
    out += (
        "\nRatios in parentheses are against `direct` in the same run; for turns/s the cost is "
        "cluster ÷ limits and the time per turn it adds (1 / turns/s). Reproduce (Redis on "
        "127.0.0.1:6379, or `--redis URL`; without one the cluster target is skipped with the "
        "reason printed; `--doc` elsewhere, since a run of these targets alone would replace "
        "this page):\n\n"
        f"```sh\n{SHARED_LIMITS_COMMAND}\n```\n"
    )
    return out


# Written by hand from the profiles of commits 8b5967c (before) and f364ebd (after); the "where
# the time goes" table above it is recomputed from the profile of each run. Kept here so that
# regenerating the document does not lose it.
APPLIED = """\
Guided by the cProfile of the gateway under 16 connections, in the order of their share of the
gateway's time (`d3baf9f` → `97be7c7`: 16 connections 0.51× → 0.68× direct, 0.62–0.68× over
the full runs made while working on it; gateway CPU per 1,000 events 23.5 → 13.1 ms; time to
first event +0.69 → +0.39 ms, +0.39 to +0.47 ms over those runs; see
[benchmarks-history.md](benchmarks-history.md)):

1. **Frames cut straight out of the read buffer** (`cch/wsframes.py`, `9892a16`, `00a02b8`).
   Autobahn's receive path was a third of the gateway's time: per event, `processData` twice,
   a frame-header object, a masker, the UTF-8 validator, message bookkeeping and a chain of
   callbacks. The upstream socket and the client edge now cut complete, final text frames with
   7- or 16-bit lengths (unmasked from an upstream, masked from a client, within the size
   limit, valid UTF-8) out of the buffer themselves; anything else stays for Autobahn, which
   keeps the whole protocol and its close codes (the byte-level tests in
   `tests/test_wsframes.py`, which also fuzz the fast path against Autobahn alone, and the
   Autobahn|Testsuite run in CI). The upstream
   `response.create` frame is masked and written directly instead of through `sendMessage`.
2. **Each event parsed once** (`9892a16`). The type was found three times per event (the pool,
   the transcript recorder, the edge), and the edge parsed every event in full anyway. Now the
   pool (or the HTTP body reader) parses each event once, where it enters, and passes its type
   down the sink chain (`ResponseSink.sse_event(data, kind)`); the edge forwards an object
   event byte for byte without looking at it again. `jsoncodec.loads` calls the C scanner
   directly for the common case (one call instead of three Python-level frames).
3. **One write per upstream read** (`cch/writes.py`, `9892a16`, `f364ebd`). An upstream read
   usually holds many events; their client frames are collected per client socket and written
   with one `transport.write` when the read is done (before control returns to the reactor, so
   latency and order are unchanged; close frames and pongs flush first). The same for the
   HTTP surface: the events of one read leave as one chunk.
4. **Per-turn set-up trimmed** (`4a6b468`, `f364ebd`, `4254ee1`, `b3de73d`, `32624ce`,
   `627a0f8`, `97be7c7`): the pool's socket fingerprint (a SHA-256 over JSON, twice per turn)
   is memoized, metric children are looked up once, log levels are filtered by a set lookup
   (comparing Twisted `LogLevel` constants walks their list), log lines share one JSON
   encoder, the upstream frame stays bytes, the first event is typed once, and outbound HTTP
   uses a plain Twisted `Agent` (`cch/httpclient.py`) with one endpoint per origin: no treq
   URL parsing with IDNA, cookie jar, redirect and content-decoding layers, or cooperator
   round trip before the body, per request (the HTTP tunnel's body, too, now goes out with its
   headers; its drain deadline runs only while the connection holds it paused).
5. **Events nobody reads are relayed as the upstream framed them** (`cch/wsframes.py`
   `relay_text_frames`, issue 18). A server's frames are unmasked on both hops, so an upstream
   event frame is already the client's frame. While an exchange delivers to a client WebSocket,
   the upstream read is walked frame by frame: the header, then the payload parsed (orjson)
   only to learn whether it is a JSON object whose type nobody reads — not a terminal or
   `response.created` (an output item's start or end is relayed too, the edge keeping a copy
   for an interrupt it may have to answer itself); malformed data, which the edge wraps as
   text, and payloads nested deeper than the standard library parses take the old path.
   Runs of frames nobody needs to read go to the client socket as one slice of the read
   buffer, with no decoding, re-encoding or per-event call chain. A named lane's events (which
   get their `stream_id`) and a client that negotiated permessage-deflate (whose frames are
   compressed) still take the relayed payloads without another parse.
6. **A read that ends inside a frame no longer hands the rest to Autobahn** (`35419ee`). Reads
   rarely end on a frame boundary under load; the fast paths stopped at the partial frame and
   let Autobahn parse it — and then every frame of the following reads, the slow way, until a
   read happened to start on a boundary. The start of a frame the fast path takes now waits in
   the buffer for the next read (a frame over the size limit still goes to Autobahn at once,
   which refuses it from its header).
7. **JSON written by orjson** when installed (`pip install 'cch[fast]'`, in the image and the
   benchmarks; `cch/jsoncodec.py`, `cch/logs.py`): the upstream frame (8.7 → 0.3 µs for a
   2 KiB frame), the transcript's size accounting and every log line (4 → 0.4 µs); what orjson
   refuses, the standard library writes. Parsing stays with the standard library (orjson turns
   integers past 64 bits into doubles). `python -m benchmarks.turn_setup`: set-up + first event
   72 → 62 µs per turn. With 5, 6 and 7 (`97be7c7` → `35419ee`): `pooled-ws` at 16
   connections 0.68× → 0.76× direct (64 connections 0.71× → 0.77×), gateway CPU per 1,000
   events 0.76× → 0.56× the fake upstream's (benchmarks-history.md).
8. **Outbound HTTP on cch's own HTTP/1.1 connection** (`cch/http11.py`, `3ded4c5`). Twisted's
   Agent read a response head line by line through a stack of protocols and handed the body
   on a chunk — for an SSE upstream, an event — at a time, five calls deep. The gateway's one
   kind of request (a POST with its body in memory) is now written in one write, the head is
   split in one pass and each read's complete chunks are joined and handed on in one call, on
   connections kept alive per origin; framing is strict (RFC 9112) and tested byte by byte
   (`tests/test_http11.py`: any chunking split at any point). An interleaved A/B against the
   Agent (3 runs, 16 connections): gateway CPU per 1,000 events `inproc-http` 24.6 → 16.3 ms
   (−34%), `http-tunnel` 42.8 → 25.6 ms (−40%, its edge posts each turn to the core over
   HTTP); turns/s 610 → 738 and 579 → 830.
"""

# The shared limits' cost as last measured (`shared_limits_section` of that run, pasted): a
# default run does not include the two targets, and regenerating the document keeps it.
SHARED_LIMITS_RECORDED = f"""\
Recorded from a run of the two targets alone (below): a default run does not include them, so
this section stays as measured until a run that includes both replaces it.

`{LOCAL_LIMITS}` is `pooled-ws` with one client key whose limits count every turn
(`max_concurrent_turns = 100,000`, `requests_per_minute = 1,000,000,000`,
`tokens_per_minute = 1,000,000,000,000`: never reached), kept in the gateway's memory;
`{SHARED_LIMITS}` keeps the same limits in Redis (`[cluster] redis = "redis://127.0.0.1:6379/0"`,
a `key_prefix` of its own for every gateway process, deleted after it stops). The limits take two
Redis round trips a turn, each one Lua script: one admits the turn before its frame goes upstream
(on the time-to-first-event path), one finishes it after its terminal event. The code measured
also wrote each response id's owner to Redis (one `SET` a turn) and read the shared marks every
2 s: 3.00 commands per turn in all (`cch_redis_commands_total` ÷ `cch_turns_started_total`).
Every keyed gateway's `/metrics` was read after its scenarios: in no run did the key's limits
refuse anything, nor did Redis fail a command, go down or leave a turn to the local fallback (a
run that shows any of these fails, and is left out of the medians).

**What Redis costs per turn** (cluster − limits within the same run, median of 5 runs): time to
first event p50 **+345 µs** (0.57 → 0.93 ms; direct 0.23 ms), gateway CPU **+312 µs** at 16
connections and **+362 µs** at 64, throughput **0.77×** at 16 connections (1,279 → 1,013 turns/s,
+228 µs per turn) and **0.71×** at 64 (1,346 → 954 turns/s, +306 µs per turn); the Redis server
itself spends about 55–60 µs of CPU per turn. Against `direct` in the same run: `{LOCAL_LIMITS}`
0.64× (16 connections) and +0.34 ms to the first event, `{SHARED_LIMITS}` 0.51× and +0.70 ms.

| metric | direct | pooled-ws-limits | pooled-ws-cluster | Redis cost |
|---|---:|---:|---:|---:|
| sequential: time to first event p50 (ms) | 0.23 | 0.57 (2.47×) | 0.93 (4.04×) | +345 µs (+132 µs to +540 µs) |
| sequential: time to first event p95 (ms) | 0.32 | 0.69 (2.15×) | 1.23 (3.85×) | +316 µs (−110 µs to +832 µs) |
| sequential: time to first event p99 (ms) | 0.43 | 0.94 (2.18×) | 1.68 (3.88×) | +738 µs (−126 µs to +2.34 ms) |
| sequential: turn time p50 (ms) | 2.78 | 3.35 (1.20×) | 4.00 (1.44×) | +627 µs (+259 µs to +1.05 ms) |
| sequential: gateway CPU per turn (ms) | 0.65 | 0.65 (1.00×) | 1.20 (1.85×) | +600 µs (+200 µs to +750 µs) |
| 16 connections: turns/s | 1,997 | 1,279 (0.64×) | 1,013 (0.51×) | 0.77× limits = +228 µs per turn (+31 µs to +642 µs) |
| 16 connections: turn time p50 (ms) | 7.20 | 12.8 (1.78×) | 14.0 (1.94×) | +1.93 ms (−1.12 ms to +8.83 ms) |
| 16 connections: gateway CPU per turn (ms) | 0.49 | 0.41 (0.82×) | 0.73 (1.47×) | +312 µs (+246 µs to +398 µs) |
| 64 connections: turns/s | 2,078 | 1,346 (0.65×) | 954 (0.46×) | 0.71× limits = +306 µs per turn (+251 µs to +663 µs) |
| 64 connections: turn time p50 (ms) | 29.7 | 47.6 (1.60×) | 67.7 (2.28×) | +19.98 ms (+16.51 ms to +37.07 ms) |
| 64 connections: gateway CPU per turn (ms) | 0.48 | 0.41 (0.86×) | 0.78 (1.62×) | +362 µs (+301 µs to +475 µs) |
| sequential: Redis server CPU per turn (ms) | – | – | 0.15 | |
| 16 connections: Redis server CPU per turn (ms) | – | – | 0.059 (6% of a core) | |
| 64 connections: Redis server CPU per turn (ms) | – | – | 0.0548 (5% of a core) | |

Ratios in parentheses are against `direct` in the same run; for turns/s the cost is cluster ÷
limits and the time per turn it adds (1 / turns/s). Redis runs on the same 2 cores as everything
else; its CPU is read from `/proc` of its process (other test runs on the machine may have used
the same Redis meanwhile). CPU is counted in 10 ms ticks: over the 200 sequential turns that is
±50 µs a turn, over the thousands of a throughput phase much less.

The run: 2 cores, AMD EPYC, Python 3.11.7; started 2026-12-06T09:18:30Z, 6.3 minutes; load
average 1.20, 1.92, 1.41 at the start and 1.66, 1.60, 1.43 at the end; 11 of 45 timed phases
were run again because other programs were busy. The cch measured was a copy of the working tree
taken at the start (HEAD `f0c132e18833` and the uncommitted work of that moment), given with
`--cch-src` so that every run measured the same code while the tree kept changing. An earlier
run of the same session on the live tree (HEAD `b69a66bd00a3`), on a busier machine (load 2.81 at
the start, 14 of 45 phases run again), gave +231 µs to the first event, +266 and +335 µs of
gateway CPU per turn, and 0.87× and 0.69× throughput (+139 and +313 µs per turn) at 16 and 64
connections. Reproduce (Redis on 127.0.0.1:6379, or `--redis URL`; without one the cluster target
is skipped with the reason printed; `--doc` elsewhere, since a run of these targets alone would
replace this page):

```sh
{SHARED_LIMITS_COMMAND}
```
"""

# What is left, from the runs and the CPU-per-block count (benchmarks/timed_gateway.py) of the
# code of this page; rewrite it with the next measurement.
REMAINING = """\
Issue 18's targets are not all reached on this machine; here is what each remaining cost is.
Two yardsticks measured in the same runs say how much of it is the machine's and how much is
cch's: **`tcp-relay`**, a second Python process that passes bytes both ways and does nothing
else (`benchmarks/relay.py`, `twisted.protocols.portforward`), and the fake upstream's **own
HTTP answer** (`direct` over HTTP, `benchmarks/httpload.py`).

**Runs differ more than the targets' margins.** Three full runs of this session (`3ded4c5`,
`05cdb96`, and this page's, after the output items' relay; an hour apart, nothing else
running) gave: `tcp-relay` 0.98×, 0.85× and 0.86× direct at 16 connections, +0.11, +0.25 and
+0.16 ms to the first event; `pooled-ws` 0.70×, 0.64× and 0.66×, +0.24, +0.42 and +0.37 ms (the
first run met the 0.3 ms target, the others missed it). The 2-core virtual machine's own speed
varies between runs (its neighbours are not visible from inside: "other programs" stayed under
3% of a core). Compare targets within a run, and with the relay.

**Time to first event.** `pooled-ws` adds 0.13–0.21 ms over the bare relay in the three runs:
the turn's set-up and its first event (below). `inproc-http` pays an HTTP upstream: the fake
upstream's own answer over HTTP comes 0.19–0.23 ms later than over WebSocket (its `twisted.web`
request parsing and a chunk per event), which the `direct` baseline never pays; over that
answer the gateway adds 0.58 ms in this page's run and 0.67 ms in the previous one (the first,
without this baseline, measured +0.56 ms over WebSocket; +1.21 ms before cch's own HTTP
client, `3ded4c5`, "What made the hot path fast", 8). `http-tunnel` adds a second HTTP exchange inside
the gateway for every turn: the edge POSTs the turn to its own listener over loopback
(`twisted.web` parses the request, the core streams the events back as SSE, the edge decodes
them), two more socket hops and an HTTP server per turn; its events cannot be relayed (the
core's sink is an HTTP response). The in-process tunnel, the default, has none of it; the HTTP
tunnel is for an edge and a core in different processes.

**Throughput and CPU.** The bare relay costs 1.2–1.5 ms of CPU per 1,000 events (about 55 µs a
turn: the reads, writes and reactor turns of passing the bytes on) and reaches 0.85–0.98×
direct; cch spends about 350–380 µs a turn at 16 connections and reaches 0.64–0.70×. The machine
leaves room: what is left is cch's own work per turn. Where it goes, counted in CPU time
(`python -m benchmarks.timed_gateway run`: the main thread's `thread_time` inside each block, 16
connections, 10 s, 12,716 turns, ledger on, before the output items' relay; the counting
itself adds about a tenth):

| µs per turn | what |
|---:|---|
| 102 | **the client's frame**: Autobahn's read, the frame cut and parsed (2 KiB of instructions), the turn's objects and its `ws_request_started` line (49), then the handler until it waits (53): key, meter, routing, eligibility, continuity, the pool, the upstream frame masked and written (12) |
| 41 | **the first event** (`response.created`): parsed in full (its response is read), the handler resumes — `upstream_attempt_started`, the transcript recorder, the exchange delivered, the idle watchdog — and the event goes through the meter to the client |
| 113 | **three more events read in full** — an output item's start and end (the edge keeps them for `response.interrupt`) and the terminal — and the turn's completion: the meter (40, the edge's part 23), the parse for their types (18 for all four), the usage row and transcript record (9), the ledger's queue (4), the pool and the exchange (4), the edge's wrap-up with its two log lines (20), the rest the Deferred chain back through the pipeline and the tunnel |
| 65 | **relaying the other 36 events**: each frame's header walked and its payload parsed (orjson) for its type, runs handed to the client socket as slices (1.7 µs an event) |
| 33 | **log lines**: five events observed per turn (18) and four `info` lines rendered (orjson) and written in batches (15) |
| 24 | **`send` system calls**: one to the client per upstream read, one upstream per turn |
| 8 | timers (the pool's idle timer, the first-event deadline, the watchdog, batch flushes) |
| 9 | the reactor loop itself, `recv` and everything else |

What it would take (0.4× the upstream's CPU is about 200 µs a turn, 45% less; 0.85× throughput
needs about as much). No block is a third of the whole, and every lever left is small or gives
up behaviour the gateway promises:

- **The Deferred and coroutine machinery** of the pipeline (the seams of issue 13: one straight
  path a turn) is about a tenth of the handler's own time (`benchmarks.turn_setup --relayed
  --profile`: 23 of 220 profiled µs a turn), about 5% of the gateway's: plain callbacks on the
  hot path would take that, at the cost of the straight path's readability.
- **Relaying the output items' frames too**, with the edge keeping a copy for the
  `response.interrupt` it must answer itself: done after the count above (`cch/wsframes.py`
  `keep`): −4% of the gateway's CPU per 1,000 events in an interleaved A/B (5 runs).
- **Log lines (33 µs, 8%)**: the reference's `info` events per turn
  (docs/reference-behaviour.md, "Log events"); fewer, or sampled, would give up that record.
- **Relaying on a prefix without the parse (~0.5 µs an event, 5%)**: the parse is what tells a
  delta from malformed data, which the edge must wrap as text (the reference's behaviour).
- **The rest** — the client frame's 2 KiB parsed with the standard library (orjson turns
  integers past 64 bits into doubles, and a gateway must not change the numbers it forwards),
  the usage row, the transcript, the pool — are each a few µs, already trimmed
  (benchmarks-history.md), and cost two to three times their warm-loop figure in a busy
  process.

All of them together come to about a fifth (the items' 4% of it now taken): on this machine, with the gateway's behaviour
kept, the throughput and CPU targets are out of reach; the time-to-first-event target for the
default path is met in a run where the machine is as fast as the relay says it can be (+0.24
ms) and missed in a slower one (+0.42 ms, the relay itself +0.25). More cores change the
picture more than any lever: the three processes of the benchmark share two, and the gateway
waits for a core as often as it works.

An earlier version of this section took its shares from a sampling profiler (py-spy), which
counts a process that waits for a core as busy wherever it waits: it put 15% of the gateway's
time in `send` system calls. Counted in CPU time they are 6%.

**RSS per idle connection** reads 0.2 KiB over `c765cdd`'s (12.3 against 12.1 KiB at 5,000,
2 runs of `c765cdd` on the same machine; idle RSS 62.2 against 62.9 MiB: met). The Python
objects of an upgraded idle connection are the same in both, to the byte (tracemalloc over
2,000 edges: 13.85 KiB each, the test transport included): the difference is the allocator's,
not anything kept per connection.
"""


def optimizations_intro(summary: dict[str, Any]) -> str:
    """Where this run stands against the targets (issue 18), from its medians."""
    parts = []
    for check in summary["targets"]:
        if check["value"] is None or check["name"].startswith(("RSS", "idle")):
            continue
        verdict = "met" if check["met"] else "missed"
        op = "≥" if check["name"].startswith("turns/s") else "≤"
        name = check["name"][0].upper() + check["name"][1:]
        parts.append(
            f"{name} (`{check['target']}`): {_fmt(check['value'])} {check['unit']}"
            f" (target {op} {_fmt(check['limit'])}: {verdict})."
        )
    return " ".join(parts)


def headline_paragraph(results: dict[str, Any], summary: dict[str, Any]) -> str:
    med, ratio = summary["median"], summary["ratio_vs_direct"]
    settings = results["settings"]
    if "pooled-ws" not in med or BASELINE not in med:
        return ""
    p, d = med["pooled-ws"], med[BASELINE]
    text = "**Headline (default mode, `pooled-ws`, medians):** "
    bits = []
    if p.get("seq_ttfe_p50_ms") is not None and d.get("seq_ttfe_p50_ms") is not None:
        bits.append(
            f"time to first event p50 {_fmt(p['seq_ttfe_p50_ms'])} ms vs {_fmt(d['seq_ttfe_p50_ms'])} ms "
            f"direct (+{p['seq_ttfe_p50_ms'] - d['seq_ttfe_p50_ms']:.2f} ms)"
        )
    for n in settings["connections"]:
        r = ratio["pooled-ws"].get(f"c{n}_turns_per_s")
        if r is not None:
            bits.append(f"{n} connections {_fmt(p[f'c{n}_turns_per_s'])} turns/s ({r:.2f}× direct)")
    n = settings["connections"][0]
    if p.get(f"c{n}_cpu_s_per_1k_events") is not None:
        bits.append(
            f"{p[f'c{n}_cpu_s_per_1k_events'] * 1000:.0f} ms of gateway CPU per 1,000 forwarded events "
            f"({ratio['pooled-ws'][f'c{n}_cpu_s_per_1k_events']:.2f}× what the fake upstream spends producing them)"
        )
    big = max(settings["idle_counts"])
    if p.get(f"idle{big}_kib_per_conn") is not None:
        bits.append(
            f"{_fmt(p[f'idle{big}_kib_per_conn'])} KiB RSS per idle connection at {big:,}, "
            f"idle RSS {_fmt(p['idle_rss_mib'])} MiB"
        )
    met = sum(1 for c in summary["targets"] if c["met"])
    missed = sum(1 for c in summary["targets"] if c["met"] is False)
    return text + "; ".join(bits) + f". Targets: {met} met, {missed} missed (see below).\n"


def code_line(results: dict[str, Any]) -> str:
    code = results["machine"].get("code") or {}
    commit = (code.get("commit") or "unknown")[:12]
    text = f"`{commit}`" + (" (with uncommitted changes to `cch/`)" if code.get("dirty") else "")
    from benchmarks.processes import REPO

    source = code.get("source")
    if source and source != str(REPO):
        text += " (measured from a separate clean clone of that commit, `--cch-src`)"
    return text


def document(
    results: dict[str, Any], summary: dict[str, Any], plot_name: str | None, json_name: str
) -> str:
    s = results["settings"]
    m = results["machine"]
    client = s["client"]
    ratio_table, abs_table = markdown_tables(results, summary)
    runs = s["runs"]
    load = m.get("loadavg_at_start")
    plot_md = (
        f"![benchmark plot](benchmarks/{plot_name})\n"
        if plot_name
        else "_Plot skipped: matplotlib is not installed._\n"
    )
    quick = (
        "\n> **This document was generated by a `--quick` run: the numbers are not meaningful.**\n"
        if s.get("quick")
        else ""
    )
    deltas = max(1, s["events"] - 8)
    return (
        f"""# Benchmarks
{quick}
`cch` measured against a baseline taken **in the same run on the same machine**: the load
client talking to the fake upstream directly. Read the ratios; absolute numbers depend on the
machine (cores, CPU, what else runs on it) and are here only to make the ratios concrete.

Reproduce everything below — numbers, plot ([`benchmarks/{json_name}`](benchmarks/{json_name}))
and this page — from a fresh checkout (this run took {results["wall_seconds"] / 60:.1f} minutes on {m.get("cores")} cores):

```sh
python3 -m venv .venv && .venv/bin/pip install -e '.[bench]' && {COMMAND}
```

(`bench` installs matplotlib and psutil; without matplotlib the plot is skipped, without psutil
the numbers come from `/proc`.) `{COMMAND} --help` lists the knobs (runs, targets, events per
turn, delta size, delay, connections, idle counts, durations); `--target ws://127.0.0.1:PORT/v1/responses`
adds another gateway as a target (give `--target-pid` for its CPU and RSS, and point it at the
fake upstream started with `--upstream-port`). `python -m benchmarks report` rebuilds this page
and the plot from the JSON without re-running. The suite is not part of the test suite;
`tests/test_benchmarks_smoke.py` runs it for a few seconds in a tiny configuration.

{headline_paragraph(results, summary)}
## Machine and run

- {m.get("cores")} cores, {m.get("cpu_model") or "unknown CPU"}; {m.get("platform")}; Python {m.get("python")};
  Twisted {m["versions"].get("twisted")}, Autobahn {m["versions"].get("autobahn")}, treq {m["versions"].get("treq")}
- cch at commit {code_line(results)}
- started {results["started_at"]}, {results["wall_seconds"] / 60:.1f} minutes; load average at start
  {", ".join(f"{x:.2f}" for x in load) if load else "unknown"}
- every number is the **median of {runs} runs**; each run starts fresh processes (upstream and
  gateway), and targets are interleaved within a run

## What is measured

Processes: the fake upstream (`python -m benchmarks.upstream`: `cch.testing.FakeUpstream` with a
configurable default script), the gateway (`python -m cch.cli --config <generated toml>`, i.e.
`twistd -n cch`, JSON logs at level `{s["log_level"]}` to a file) and the load client (the
`python -m benchmarks` process itself: a minimal WebSocket client on the Twisted reactor,
`benchmarks/wsclient.py`) each run on their own, on 127.0.0.1 only.
CPU seconds and RSS are read from `/proc/<pid>` of the **server** process: the gateway for cch
targets, the fake upstream for `direct`.

Targets:

| target | what |
|---|---|
"""
        + "".join(f"| `{k}` | {v} |\n" for k, v in results["targets"].items())
        + f"""
Every turn is a Codex-like `response.create` (`store: {str(client["store"]).lower()}`, {client["request_bytes"]:,}-byte
`instructions`, conversations of {client["chain"]} turns chained with `previous_response_id`) answered with
{s["events"]} events: 8 framing events (`response.created` … `response.completed`) and {deltas} `output_text.delta`
events of {s["delta_bytes"]} bytes of text; {s["delay"]:g} s between events.

Scenarios:

- **sequential**: one connection, {s["seq_turns"]} turns one after the other (after {s["warmup"]} warm-up
  turns): time to first event (TTFE: frame sent → first event received) and turn time
  (→ terminal event), p50/p95/p99. For this scenario the fake upstream pauses
  {s["seq_gap_ms"]:g} ms after `response.created` (asked for in the frame's `metadata`), as a real
  upstream sends its first event long before the rest: otherwise the whole response arrives in
  one TCP read and the first event reaches the client only after the gateway has processed all
  of them. TTFE is therefore the path of one event plus the turn set-up; turn time includes the
  pause.
- **sequential over HTTP** (`direct` only): the same turns POSTed to the fake upstream and
  answered as SSE (`benchmarks/httpload.py`, on cch's own HTTP client; each turn replays its
  conversation, as the gateway does for an HTTP upstream): the fake upstream's own HTTP answer,
  which costs it more than a WebSocket frame. `inproc-http`'s time to first event is judged
  against both: the `direct` WebSocket baseline (what a client sees) and this (what the
  gateway adds to an HTTP upstream's first event).
- **{" and ".join(str(n) for n in s["connections"])} connections**: every connection runs turns back to back for
  {s["duration"]:g} s after one warm-up turn each: turns/s, events/s, and CPU seconds of the server
  process per 1,000 forwarded events (for `direct` that is the fake upstream's own cost of
  producing them).
- **idle connections**: {" then ".join(f"{n:,}" for n in s["idle_counts"])} upgraded connections held open, no turns:
  (RSS − idle RSS) / connections, measured a moment after the last one opened (at most
  {s["client"]["connect_concurrency"]} handshakes in flight at a time). Idle RSS is taken after one turn
  on a fresh process, before any of these connections.
- **socket reuse**: one conversation of {s["reuse_turns"]} turns; mean turn time of turns 2..N. With reuse:
  the gateway keeps its upstream WebSocket (default). Without: `upstream_websocket.max_socket_age`
  is set to 1 µs so every turn gets a fresh upstream socket and, since `store: false` responses
  live on the socket that produced them, the gateway replays the conversation from its
  transcript. The `direct` row without reuse opens a new connection per turn and sends the whole
  conversation itself (timed from the connect). `inproc-http` has no upstream socket to keep
  (HTTP keep-alive is always on), so it has no "without" number.

Note on `inproc-http`: an HTTP upstream cannot resolve a `store: false` `previous_response_id`,
so cch replays the conversation from its transcript on every turn ([architecture.md](architecture.md#continuity)): its
request bodies grow along each {client["chain"]}-turn conversation. That cost is real for Codex on an
HTTP-only upstream and is part of its numbers.

## Results: ratios vs direct

Median of {runs} runs. `direct (absolute)` is the baseline's own number; the other columns are
target ÷ direct (for times and CPU lower is better, for throughput higher is better).

{ratio_table}
Absolute medians (min–max over the runs in parentheses):

{abs_table}
{plot_md}
## Targets (2-core machine, medians of ≥ 3 runs)

{targets_list(summary)}

## What limits these numbers

CPU used by each process during the throughput phases (median; 100% = one core):

{utilization_table(results, summary)}
{limits_paragraph(results, summary)}

## Shared limits through Redis

{shared_limits_section(results, summary)}
{deflate_section()}## Profile: the per-event path

{profile_section(results.get("profile"))}
## What made the hot path fast

{APPLIED}
## What is left

{optimizations_intro(summary)}

{REMAINING}"""
    )


def write_outputs(
    results: dict[str, Any], out_dir: Path, doc_path: Path | None, *, make_plot: bool = True
) -> dict[str, Any]:
    """Write results.json, the plot and the document; returns the summary."""
    import json

    summary = summarize(results)
    results["summary"] = summary
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    plot_name = None
    if make_plot and plot(results, summary, out_dir / "benchmarks.png"):
        plot_name = "benchmarks.png"
    if doc_path is not None:
        doc_path.parent.mkdir(parents=True, exist_ok=True)
        doc_path.write_text(document(results, summary, plot_name, json_path.name))
    return summary


Printer = Callable[[str], None]


def headline(summary: dict[str, Any], settings: dict[str, Any], say: Printer = print) -> None:
    med, ratio = summary["median"], summary["ratio_vs_direct"]
    keys = ["seq_ttfe_p50_ms", "seq_turn_p50_ms"] + [
        f"c{n}_turns_per_s" for n in settings["connections"]
    ]
    keys += [f"c{n}_cpu_s_per_1k_events" for n in settings["connections"]]
    keys += ["idle_rss_mib"] + [f"idle{n}_kib_per_conn" for n in settings["idle_counts"]]
    keys += ["reuse_turn_mean_ms", "no_reuse_turn_mean_ms"]
    targets = list(med)
    say("metric".ljust(28) + "".join(t.rjust(22) for t in targets))
    for key in keys:
        cells = []
        for t in targets:
            v = med[t].get(key)
            r = ratio[t].get(key)
            cell = _fmt(v) + ("" if t == BASELINE or r is None else f" ({r:.2f}x)")
            cells.append(cell.rjust(22))
        say(key.ljust(28) + "".join(cells))
    cost = summary.get("shared_limits")
    if cost:
        diff = cost["difference"]
        say("")
        say(f"Redis cost: {SHARED_LIMITS} - {LOCAL_LIMITS}, same run, median of {cost['pairs']}")
        say(
            f"  time to first event p50 {_us(diff.get('seq_ttfe_p50_ms'))}, gateway CPU per "
            f"turn (sequential) {_us(diff.get('seq_server_cpu_ms_per_turn'))}"
        )
        for n in settings["connections"]:
            r, us = diff.get(f"c{n}_turns_per_s_ratio"), diff.get(f"c{n}_us_per_turn")
            if r is not None and us is not None:
                say(f"  {n} connections: turns/s {r:.2f}x limits, {_us(us / 1000)} per turn")
    say("")
    say(targets_list(summary))
