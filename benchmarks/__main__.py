"""``python -m benchmarks run``: the whole suite, its JSON, plot and docs/benchmarks.md.

``python -m benchmarks report``: rebuild the plot and the document from an existing JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.load import LoadConfig
from benchmarks.processes import REPO
from benchmarks.runner import (
    DEFAULT_TARGETS,
    TARGETS,
    Runner,
    Settings,
    make_workdir,
    prepare_process,
    remove_workdir,
)
from benchmarks.wsclient import check_loopback
from cch.cluster.redis import RedisAddress


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}"
        )
    if "direct" not in names:
        names = ("direct", *names)  # the baseline is always measured
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    defaults = Settings()
    run = sub.add_parser("run", help="run the benchmark suite")
    run.add_argument(
        "--quick",
        action="store_true",
        help="a few seconds, tiny sizes (smoke test; numbers meaningless)",
    )
    run.add_argument(
        "--runs",
        type=int,
        help=f"repeats of every target (default {defaults.runs}; medians are reported)",
    )
    run.add_argument(
        "--targets",
        type=_targets,
        default=DEFAULT_TARGETS,
        help="comma-separated, direct is always included (default: " + ",".join(DEFAULT_TARGETS) + "): " + ", ".join(TARGETS),
    )
    run.add_argument(
        "--redis",
        dest="redis_url",
        help=f"the Redis of the pooled-ws-cluster target (default {defaults.redis_url}); the target "
        "is skipped when it does not answer",
    )
    run.add_argument(
        "--target",
        dest="external_url",
        help="also benchmark another gateway at ws://127.0.0.1:PORT/v1/responses",
    )
    run.add_argument(
        "--target-pid", dest="external_pid", type=int, help="pid of that gateway (for CPU and RSS)"
    )
    run.add_argument(
        "--target-header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="extra upgrade header (e.g. Authorization)",
    )
    run.add_argument(
        "--events", type=int, help=f"events per turn, >= 9 (default {defaults.events})"
    )
    run.add_argument(
        "--delta-bytes",
        type=int,
        help=f"bytes of text per delta event (default {defaults.delta_bytes})",
    )
    run.add_argument(
        "--delay",
        type=float,
        help=f"upstream delay between events, seconds (default {defaults.delay})",
    )
    run.add_argument(
        "--request-bytes", type=int, help="size of each frame's instructions (default 2048)"
    )
    run.add_argument("--chain", type=int, help="turns per conversation (default 10)")
    run.add_argument(
        "--store",
        choices=["false", "true"],
        help="the frames' store flag (default false, like Codex)",
    )
    run.add_argument(
        "--seq-turns", type=int, help=f"measured sequential turns (default {defaults.seq_turns})"
    )
    run.add_argument(
        "--seq-gap-ms",
        type=float,
        help=f"sequential: upstream pause after the first event (default {defaults.seq_gap_ms})",
    )
    run.add_argument(
        "--connections", type=_ints, help="concurrent connection counts (default 16,64)"
    )
    run.add_argument(
        "--duration", type=float, help=f"seconds per throughput phase (default {defaults.duration})"
    )
    run.add_argument(
        "--idle", dest="idle_counts", type=_ints, help="idle connection counts (default 1000,5000)"
    )
    run.add_argument(
        "--reuse-turns",
        type=int,
        help=f"turns of the socket-reuse conversation (default {defaults.reuse_turns})",
    )
    run.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait at most, before each target, for other programs to go quiet (default 15)",
    )
    run.add_argument(
        "--noise-retries",
        type=int,
        help="re-run a timed phase disturbed by other programs up to this many times (default 1)",
    )
    run.add_argument("--log-level", help="gateway CCH_LOG_LEVEL (default info, as deployed)")
    run.add_argument(
        "--no-profile", action="store_true", help="skip the cProfile run of the gateway"
    )
    run.add_argument(
        "--profile-duration",
        type=float,
        help=f"seconds of the profiled run (default {defaults.profile_duration})",
    )
    run.add_argument(
        "--out",
        type=Path,
        default=REPO / "docs" / "benchmarks",
        help="directory for results.json and the plot",
    )
    run.add_argument(
        "--doc",
        type=Path,
        default=REPO / "docs" / "benchmarks.md",
        help="the Markdown report to write",
    )
    run.add_argument("--no-doc", action="store_true", help="do not write the Markdown report")
    run.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    run.add_argument(
        "--cch-src",
        type=Path,
        help="benchmark the cch in this source tree (e.g. a `git clone` of a commit) instead of "
        "this checkout's working tree",
    )
    run.add_argument(
        "--workdir",
        help="keep logs, generated configs and the .prof file here (default: a temp dir, removed)",
    )
    run.add_argument(
        "--upstream-port",
        type=int,
        help="fixed port of the fake upstream for the --target run (point that gateway at http://127.0.0.1:PORT/v1)",
    )
    rep = sub.add_parser("report", help="rebuild the plot and the document from results.json")
    rep.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    rep.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in (
        "runs", "events", "delta_bytes", "delay", "seq_turns", "seq_gap_ms", "connections", "duration",
        "idle_counts", "reuse_turns", "log_level", "profile_duration", "external_url", "external_pid",
        "upstream_port", "quiet_wait", "noise_retries", "redis_url",
    ):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    overrides["targets"] = args.targets
    if args.cch_src is not None:
        source = args.cch_src.resolve()
        if not (source / "cch" / "cli.py").exists():
            raise SystemExit(f"--cch-src: {source} has no cch/cli.py")
        overrides["source"] = source
    if args.no_profile:
        overrides["profile"] = False
    client: dict[str, Any] = {}
    if args.request_bytes is not None:
        client["request_bytes"] = args.request_bytes
    if args.chain is not None:
        client["chain"] = args.chain
    if args.store is not None:
        client["store"] = args.store == "true"
    headers = {}
    for item in args.target_header:
        name, _, value = item.partition(":")
        headers[name.strip()] = value.strip()
    client["headers"] = headers
    overrides["client"] = LoadConfig(**client)
    settings = Settings.quick_settings(**overrides) if args.quick else Settings(**overrides)
    if settings.events < 9:
        raise SystemExit("--events must be at least 9 (8 framing events and one delta)")
    if settings.external_url:
        try:
            check_loopback(settings.external_url)
        except ValueError as exc:
            raise SystemExit(f"--target: {exc}") from None
    try:
        RedisAddress.from_url(settings.redis_url)
    except ValueError:
        raise SystemExit("--redis: expected redis://[[user]:password@]host[:port][/db]") from None
    return settings


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    limit = prepare_process()
    need = max(settings.idle_counts) + max(settings.connections) + 256
    if limit < need:
        print(
            f"warning: RLIMIT_NOFILE is {limit}; {need} descriptors are needed for the idle scenario",
            file=sys.stderr,
        )
    workdir, temporary = make_workdir(args.workdir)

    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    def say(text: str) -> None:
        print(text, flush=True)

    results: dict[str, Any] = {}
    # The command must end even if something hangs: the whole run is bounded too.
    budget = 20 * 60 if not settings.quick else 120

    async def main(reactor: Any) -> None:
        runner = Runner(reactor, settings, workdir, say)
        watchdog = reactor.callLater(budget, _give_up, runner, reactor)
        try:
            results.update(await runner.run())
        finally:
            if watchdog.active():
                watchdog.cancel()

    def _give_up(runner: Runner, reactor: Any) -> None:
        print(f"error: the run took longer than {budget} s; giving up", file=sys.stderr, flush=True)
        runner.kill_all()
        reactor.stop()

    try:
        react(lambda r: ensureDeferred(main(r)))
    except SystemExit as exit:
        if exit.code not in (0, None) or not results:
            print(f"benchmark run failed; logs are in {workdir}", file=sys.stderr)
            return int(exit.code or 1)
    summary = report.write_outputs(
        results, args.out, None if args.no_doc else args.doc, make_plot=not args.no_plot
    )
    say("")
    report.headline(summary, results["settings"], say)
    say("")
    say(f"results: {args.out / 'results.json'}" + ("" if args.no_doc else f"; report: {args.doc}"))
    failed = [run for run in results["runs"] if run.get("failed")]
    if temporary and not failed:
        remove_workdir(workdir)
    else:
        say(f"logs, configs and profile: {workdir}")
    if failed:
        for run in failed:
            for problem in run["failed"]:
                print(f"FAILED {run['target']} run {run['run'] + 1}: {problem}", file=sys.stderr)
        print(
            f"{len(failed)} run(s) failed their limits check and are left out of the summary",
            file=sys.stderr,
        )
        return 1
    return 0


def rebuild(args: argparse.Namespace) -> int:
    results = json.loads((args.out / "results.json").read_text())
    results.pop("summary", None)
    summary = report.write_outputs(results, args.out, args.doc)
    report.headline(summary, results["settings"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    return rebuild(args)


if __name__ == "__main__":
    sys.exit(main())
