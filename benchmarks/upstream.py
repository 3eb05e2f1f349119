"""The benchmark upstream: ``cch.testing.FakeUpstream`` in its own process, with a configurable
default script (events per turn, bytes per delta, delay between events).

    python -m benchmarks.upstream --port 8090 --events 40 --delta-bytes 16 --delay 0

Every turn (HTTP SSE or WebSocket) gets the Codex-shaped event sequence of
``cch.testing.scripts.codex_events``: response.created, response.in_progress,
output_item.added, content_part.added, ``events - 8`` output_text.delta events of
``delta-bytes`` bytes of text each, output_text.done, content_part.done, output_item.done,
response.completed, with ``delay`` seconds between events. With ``--text-file`` the deltas are
instead the words of that file (one word, with its trailing space, per delta, as a model's
tokens come), a different stretch for every turn; with ``--echo-request`` the response objects
of response.created, response.in_progress and response.completed carry the request's
``instructions`` and ``tools`` back, as OpenAI's do (``benchmarks/deflate.py`` uses both). A request may ask for a pause after
the first event with ``metadata.bench_first_event_gap_ms`` (see ``first_event_gap``). ``previous_response_id`` follows OpenAI's rules (``store:false`` responses
are known only on the WebSocket connection that produced them), as in the tests.

The fake records every request for assertions; a benchmark sends tens of thousands, so that
record is trimmed every second to keep the process's memory flat. Prints one JSON line
``{"ready": true, "port": N}`` once it listens. 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
from collections.abc import Callable
from typing import Any

from cch.testing import Delay, Event, FakeUpstream, Recorded, Script, codex_events, json_response
from cch.testing.scripts import SSE_HEADERS

FRAMING_EVENTS = 8  # events of a codex_like turn besides the output_text.delta events
GAP_KEY = "bench_first_event_gap_ms"


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


def output_text(events: int, delta_bytes: int) -> str:
    """A text that ``codex_events`` cuts into exactly ``events - 8`` deltas of
    ``delta_bytes`` bytes (it splits after whitespace)."""
    deltas = max(1, events - FRAMING_EVENTS)
    size = max(2, delta_bytes)
    return ("x" * (size - 1) + " ") * deltas


ECHOED = ("instructions", "tools", "tool_choice", "parallel_tool_calls", "reasoning", "text")


def script_factory(
    events: int,
    delta_bytes: int,
    delay: float,
    *,
    words: list[str] | None = None,
    echo_request: bool = False,
) -> Callable[[Recorded], Script]:
    """The default script of the benchmark upstream (see the module docstring)."""
    fixed = output_text(events, delta_bytes)
    count = max(1, events - FRAMING_EVENTS)
    turns = [0]

    def script(recorded: Recorded) -> Script:
        text = fixed
        if words:
            start = (turns[0] * count) % len(words)
            turns[0] += 1
            text = "".join(words[(start + i) % len(words)] for i in range(count))
        items = codex_events(recorded, text=text)
        if echo_request:
            echoed = {key: recorded.body[key] for key in ECHOED if key in recorded.body}
            for item in items:
                if isinstance(item.get("response"), dict):
                    item["response"].update(echoed)
        if recorded.transport == "http" and not recorded.body.get("stream"):
            return json_response(200, items[-1]["response"])
        gap = first_event_gap(recorded.body)
        steps: list[Any] = []
        for i, item in enumerate(items):
            if i == 1 and gap > 0:
                steps.append(Delay(gap))
            elif i and delay > 0:
                steps.append(Delay(delay))
            steps.append(Event(item))
        return Script(tuple(steps), headers=SSE_HEADERS)

    return script


def first_event_gap(body: dict[str, Any]) -> float:
    """Seconds to pause after the first event, as the request asks in
    ``metadata.bench_first_event_gap_ms`` (a string, like every metadata value): a real upstream
    sends response.created long before the rest, so the first event travels alone."""
    metadata = body.get("metadata")
    value = metadata.get(GAP_KEY) if isinstance(metadata, dict) else None
    try:
        ms = float(value) if isinstance(value, str) else 0.0
    except ValueError:
        return 0.0
    return min(max(ms, 0.0), 1000.0) / 1000


def trim(fake: FakeUpstream) -> None:
    """Forget what was recorded so far (nothing reads it in a benchmark). What the fake needs to
    resolve previous_response_id is kept: store=false ids live on their connection's session,
    stored ids in the fake's global id set."""
    fake.requests.clear()
    live = [record for record in fake.ws_connections if not record.closed]
    for record in live:
        record.turns.clear()
    fake.ws_connections[:] = live
    fake._responses.clear()  # only FakeUpstream.conversation() reads it


def serve(fake: FakeUpstream, port: int) -> int:
    """Listen on 127.0.0.1:``port``, announce the port as a JSON line on stdout, trim the
    fake's records every second, and run the reactor; the exit status."""
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall

    status = {"code": 0}

    def listening(listening_port: Any) -> None:
        print(json.dumps({"ready": True, "port": listening_port.getHost().port}), flush=True)

    def failed(failure: Any) -> None:
        print(json.dumps({"ready": False, "error": str(failure.value)}), flush=True)
        status["code"] = 1
        reactor.stop()

    fake.listen(reactor, "127.0.0.1", port).addCallbacks(listening, failed)
    LoopingCall(trim, fake).start(1.0, now=False)
    reactor.run()
    return status["code"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.upstream", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any free one)"
    )
    parser.add_argument("--events", type=int, default=40, help="events per turn (>= 9)")
    parser.add_argument("--delta-bytes", type=int, default=16, help="bytes of text per delta event")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between events")
    parser.add_argument("--text-file", help="deltas are this file's words, one per delta")
    parser.add_argument(
        "--echo-request",
        action="store_true",
        help="response objects carry the request's instructions and tools, as OpenAI's do",
    )
    args = parser.parse_args(argv)
    raise_nofile_limit()

    from twisted.internet import reactor

    words = None
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            words = re.findall(r"\S+\s*", f.read()) or None
    fake = FakeUpstream(reactor, id_prefix="resp_bench")
    fake.default = script_factory(
        args.events, args.delta_bytes, args.delay, words=words, echo_request=args.echo_request
    )
    return serve(fake, args.port)


if __name__ == "__main__":
    sys.exit(main())
