"""Tests for cch.logs: query masking, JSON-line and text rendering, observers."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel

from cch.logs import (
    JsonLinesObserver,
    TextLinesObserver,
    json_line,
    make_observer,
    mask_query,
    text_line,
)

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def capture(emit: Any, namespace: str = "cch.test") -> LogEvent:
    """Emit one event through a real Logger and return it."""
    events: list[LogEvent] = []
    emit(Logger(namespace=namespace, observer=events.append))
    (event,) = events
    return event


def rendered(event: LogEvent) -> dict[str, Any]:
    line = json_line(event)
    assert line is not None
    assert "\n" not in line
    return json.loads(line)


# --- mask_query -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("/v1/responses", "/v1/responses"),
        ("/v1/responses?model=gpt-5.5", "/v1/responses?model=gpt-5.5"),
        (
            "/v1/responses?api_key=sk-secret&token=abc&user=alice",
            "/v1/responses?api_key=***&token=***&user=***",
        ),
    ],
)
def test_mask_query_reference_examples(url: str, masked: str) -> None:
    assert mask_query(url) == masked


@pytest.mark.parametrize("url", [None, "", b"", 42, ["/x"]])
def test_mask_query_of_non_string_or_empty_is_slash(url: Any) -> None:
    assert mask_query(url) == "/"


def test_mask_query_parse_failure_is_slash() -> None:
    assert mask_query("http://[::1/v1?key=secret") == "/"


def test_mask_query_keeps_model_case_insensitively_and_key_order() -> None:
    url = "/v1/responses?key=k1&Model=gpt-5&b=2&MODEL=o3"
    assert mask_query(url) == "/v1/responses?key=***&Model=gpt-5&b=***&MODEL=o3"


def test_mask_query_masks_blank_values_and_bare_keys() -> None:
    assert mask_query("/x?a=&b&&c=1") == "/x?a=***&b=***&c=***"


def test_mask_query_form_encodes_kept_values() -> None:
    assert mask_query("/x?model=gpt%205+mini%2Fa") == "/x?model=gpt+5+mini%2Fa"


def test_mask_query_drops_empty_query_and_fragment() -> None:
    assert mask_query("/v1/responses?") == "/v1/responses"
    assert mask_query("/v1/responses#frag") == "/v1/responses"
    assert mask_query("/v1/responses?model=m#token=x") == "/v1/responses?model=m"


def test_mask_query_reduces_absolute_url_to_path() -> None:
    assert mask_query("https://user:pw@example.com/v1/responses?key=s") == "/v1/responses?key=***"


def test_mask_query_resolves_relative_url_against_root() -> None:
    assert mask_query("v1/responses") == "/v1/responses"
    assert mask_query("?token=t") == "/?token=***"


def test_mask_query_accepts_bytes() -> None:
    assert mask_query(b"/v1/responses?model=m&api_key=sk") == "/v1/responses?model=m&api_key=***"


def test_mask_query_percent_encodes_odd_path_characters() -> None:
    assert mask_query("/a b/\u00e9") == "/a%20b/%C3%A9"


query_keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
query_values = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=4, max_size=12)


@given(pairs=st.lists(st.tuples(query_keys, query_values), max_size=6))
def test_mask_query_never_leaks_non_model_values(pairs: list[tuple[str, str]]) -> None:
    masked = mask_query("/v1/responses?" + urlencode(pairs))
    assert masked.startswith("/v1/responses")
    model_values = [v for k, v in pairs if k == "model"]
    for key, value in pairs:
        if key == "model":
            assert f"{key}={value}" in masked
        elif not any(value in m for m in model_values):
            assert value not in masked
            assert f"{key}=***" in masked


@given(st.one_of(st.text(max_size=60), st.binary(max_size=60)))
def test_mask_query_never_raises(url: str | bytes) -> None:
    assert isinstance(mask_query(url), str)


# --- json_line ----------------------------------------------------------------------------


def test_json_line_shape_for_our_events() -> None:
    event = capture(lambda log: log.info("ws_client_connected", path="/v1/responses"))
    assert list(rendered(event).items()) == [
        ("ts", rendered(event)["ts"]),
        ("level", "info"),
        ("msg", "ws_client_connected"),
        ("ns", "cch.test"),
        ("path", "/v1/responses"),
    ]
    assert TS.fullmatch(rendered(event)["ts"])


def test_json_line_is_compact_and_keeps_non_ascii() -> None:
    event = capture(lambda log: log.info("x", model="gpt-\u00e9"))
    line = json_line(event)
    assert line is not None
    assert ", " not in line and '": ' not in line
    assert "gpt-\u00e9" in line


def test_json_line_timestamp_is_utc_with_milliseconds() -> None:
    event = {"log_format": "x", "log_time": 1700000000.1239, "log_level": LogLevel.info}
    assert rendered(event)["ts"] == "2023-11-14T22:13:20.123Z"


@pytest.mark.parametrize(
    ("level", "name"),
    [
        (LogLevel.debug, "debug"),
        (LogLevel.info, "info"),
        (LogLevel.warn, "warn"),
        (LogLevel.error, "error"),
        (LogLevel.critical, "critical"),
    ],
)
def test_json_line_level_names(level: LogLevel, name: str) -> None:
    event = capture(lambda log: log.emit(level, "ws_event"))
    assert rendered(event)["level"] == name


def test_json_line_keeps_field_types() -> None:
    event = capture(
        lambda log: log.warn(
            "ws_pending_overflow",
            pendingFrames=3,
            pendingBytes=1.5,
            flag=True,
            none=None,
            items=[1, "a"],
            nested={"k": 1},
        )
    )
    record = rendered(event)
    assert record["pendingFrames"] == 3
    assert record["pendingBytes"] == 1.5
    assert record["flag"] is True
    assert record["none"] is None
    assert record["items"] == [1, "a"]
    assert record["nested"] == {"k": 1}


def test_json_line_renders_unserialisable_fields_with_repr() -> None:
    class Thing:
        def __repr__(self) -> str:
            return "<Thing>"

    event = capture(
        lambda log: log.info("x", thing=Thing(), nan=float("nan"), keys={(1, 2): "v"}, ok=1)
    )
    record = rendered(event)
    assert record["thing"] == "<Thing>"
    assert record["nan"] == "nan"
    assert record["keys"] == "{(1, 2): 'v'}"
    assert record["ok"] == 1


def test_json_line_handles_cyclic_field() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    record = rendered(capture(lambda log: log.info("x", cycle=cycle)))
    assert record["cycle"] == "[[...]]"


def test_json_line_omits_log_fields() -> None:
    record = rendered(capture(lambda log: log.info("x", a=1)))
    assert not any(key.startswith("log_") for key in record)


def test_json_line_library_events_are_formatted_and_fields_not_dumped() -> None:
    event = capture(lambda log: log.info("Site starting on {port}", port=8080, secret_obj=object()))
    record = rendered(event)
    assert record["msg"] == "Site starting on 8080"
    assert set(record) == {"ts", "level", "msg", "ns"}


def test_json_line_failure_adds_error_text() -> None:
    def emit(log: Logger) -> None:
        try:
            raise ValueError("boom")
        except ValueError:
            log.failure("ws_handler_error")

    record = rendered(capture(emit))
    assert record["level"] == "critical"
    assert record["msg"] == "ws_handler_error"
    assert record["error"] == "boom"


def test_json_line_failure_without_message_uses_exception_type() -> None:
    def emit(log: Logger) -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            log.failure("ws_handler_error")

    assert rendered(capture(emit))["error"] == "KeyboardInterrupt"


def test_json_line_error_field_is_kept() -> None:
    record = rendered(capture(lambda log: log.warn("ws_send_failed", reason="r", error="e")))
    assert record["error"] == "e"
    assert record["reason"] == "r"


def test_json_line_fields_cannot_overwrite_line_keys() -> None:
    event = capture(lambda log: log.info("x", ts=1, msg="m", ns="n"))
    record = rendered({**event, "level": "bogus"})
    assert record["level"] == "info"
    assert record["msg"] == "x"
    assert record["ns"] == "cch.test"
    moved = {key: record[key] for key in ("_ts", "_level", "_msg", "_ns")}
    assert moved == {"_ts": 1, "_level": "bogus", "_msg": "m", "_ns": "n"}


@pytest.mark.parametrize(
    "name",
    [
        "authorization",
        "Authorization",
        "proxy_authorization",
        "api_key",
        "apiKey",
        "x-api-key",
        "key",
        "secret",
        "internalSecret",
        "token",
        "accessToken",
        "password",
        "cookie",
    ],
)
def test_json_line_masks_secret_like_fields(name: str) -> None:
    record = rendered(capture(lambda log: log.info("x", **{name: "sk-live-123"})))
    assert record[name] == "***"
    assert "sk-live-123" not in json.dumps(record)


@pytest.mark.parametrize("name", ["inputTokens", "tokenCount", "model", "keyword", "path"])
def test_json_line_keeps_fields_that_only_resemble_secrets(name: str) -> None:
    assert rendered(capture(lambda log: log.info("x", **{name: 7})))[name] == 7


def test_json_line_masks_secrets_in_text_lines_too() -> None:
    line = text_line(capture(lambda log: log.info("x", api_key="sk-live-123")))
    assert "sk-live-123" not in line
    assert "api_key=***" in line


def test_json_line_with_nothing_to_say_is_none() -> None:
    assert json_line({"log_level": LogLevel.info, "log_time": 0.0}) is None
    assert json_line(capture(lambda log: log.info("{empty}", empty=""))) is None


def test_json_line_never_fails() -> None:
    class Evil:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

        def __str__(self) -> str:
            raise RuntimeError("no str")

    for event in [
        {"log_format": "x", "thing": Evil()},
        {"log_format": Evil(), "log_time": "not a time"},
        {"log_format": "x", "log_failure": Evil()},
        {"log_format": "{x!r}", "x": Evil()},
    ]:
        line = json_line(event)
        assert line is not None
        json.loads(line)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@given(
    fields=st.dictionaries(
        st.text(min_size=1, max_size=10).filter(lambda k: not k.startswith("log_")),
        json_values | st.builds(object) | st.binary(max_size=5),
        max_size=6,
    )
)
def test_json_line_is_always_one_valid_json_object(fields: dict[str, Any]) -> None:
    line = json_line({"log_format": "evt", "log_level": LogLevel.info, **fields})
    assert line is not None
    assert "\n" not in line
    record = json.loads(line)
    assert record["msg"] == "evt"


# --- text_line ----------------------------------------------------------------------------


def test_text_line_format() -> None:
    event = capture(lambda log: log.warn("ws_send_failed", reason="outbound_closed", n=3))
    line = text_line(event)
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d\.\d{3} WARN ws_send_failed reason=outbound_closed n=3", line
    ), line


def test_text_line_quotes_values_with_spaces() -> None:
    line = text_line(capture(lambda log: log.info("x", error="connection lost")))
    assert line.endswith('x error="connection lost"')


def test_text_line_for_library_events_shows_formatted_message_only() -> None:
    line = text_line(capture(lambda log: log.info("Listening on {port}", port=80)))
    assert line.endswith(" INFO Listening on 80")


# --- observers ----------------------------------------------------------------------------


def test_json_observer_writes_one_line_per_event() -> None:
    out = io.StringIO()
    log = Logger(namespace="cch.test", observer=JsonLinesObserver(out))
    log.info("a", n=1)
    log.error("b")
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["msg"] for line in lines] == ["a", "b"]
    assert out.getvalue().endswith("\n")


def test_observer_drops_events_below_min_level() -> None:
    out = io.StringIO()
    log = Logger(observer=JsonLinesObserver(out, min_level=LogLevel.warn))
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.critical("c")
    levels = [json.loads(line)["level"] for line in out.getvalue().splitlines()]
    assert levels == ["warn", "critical"]


def test_observer_default_min_level_is_info() -> None:
    out = io.StringIO()
    log = Logger(observer=JsonLinesObserver(out))
    log.debug("d")
    assert out.getvalue() == ""


def test_observer_skips_events_with_nothing_to_say() -> None:
    out = io.StringIO()
    JsonLinesObserver(out)({"log_level": LogLevel.info})
    assert out.getvalue() == ""


def test_observer_flushes_each_line() -> None:
    class Out(io.StringIO):
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1

    out = Out()
    Logger(observer=JsonLinesObserver(out)).info("a")
    assert out.flushes == 1


def test_observers_provide_ilogobserver() -> None:
    assert ILogObserver.providedBy(JsonLinesObserver(io.StringIO()))
    assert ILogObserver.providedBy(TextLinesObserver(io.StringIO()))


class FakeTTY(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_make_observer_auto_picks_text_for_a_terminal_and_json_otherwise() -> None:
    assert isinstance(make_observer(FakeTTY(True)), TextLinesObserver)
    assert isinstance(make_observer(FakeTTY(False)), JsonLinesObserver)


def test_make_observer_auto_on_closed_stream_picks_json() -> None:
    out = io.StringIO()
    out.close()
    assert isinstance(make_observer(out), JsonLinesObserver)


def test_make_observer_explicit_format_ignores_tty() -> None:
    assert isinstance(make_observer(FakeTTY(True), "json"), JsonLinesObserver)
    assert isinstance(make_observer(FakeTTY(False), "text"), TextLinesObserver)


def test_make_observer_accepts_level_name_or_level() -> None:
    out = io.StringIO()
    log = Logger(observer=make_observer(out, "json", "debug"))
    log.debug("d")
    log2 = Logger(observer=make_observer(out, "json", LogLevel.error))
    log2.warn("w")
    assert [json.loads(line)["msg"] for line in out.getvalue().splitlines()] == ["d"]


def test_make_observer_rejects_unknown_format_and_level() -> None:
    with pytest.raises(ValueError, match="log format"):
        make_observer(io.StringIO(), "xml")
    with pytest.raises(ValueError, match="log level"):
        make_observer(io.StringIO(), "json", "loud")


def test_make_observer_level_name_is_case_insensitive() -> None:
    out = io.StringIO()
    log = Logger(observer=make_observer(out, "json", "WARN"))
    log.info("i")
    log.error("e")
    assert [json.loads(line)["msg"] for line in out.getvalue().splitlines()] == ["e"]


def test_batched_observer_writes_a_moment_later_in_order() -> None:
    import io

    from twisted.internet.task import Clock

    from cch.logs import make_observer

    out, clock = io.StringIO(), Clock()
    observer = make_observer(out, "json", batch=clock)
    observer({"log_format": "first", "log_level": LogLevel.info, "log_time": 0.0, "log_namespace": "t"})
    observer({"log_format": "second", "log_level": LogLevel.info, "log_time": 0.0, "log_namespace": "t"})
    assert out.getvalue() == ""
    clock.advance(0.05)
    assert [json.loads(line)["msg"] for line in out.getvalue().splitlines()] == ["first", "second"]
    assert clock.getDelayedCalls() == []
    observer({"log_format": "third", "log_level": LogLevel.info, "log_time": 0.0, "log_namespace": "t"})
    observer({"log_format": "boom", "log_level": LogLevel.error, "log_time": 0.0, "log_namespace": "t"})
    assert [json.loads(line)["msg"] for line in out.getvalue().splitlines()][-2:] == ["third", "boom"]
    assert clock.getDelayedCalls() == []


def test_batched_observer_writes_at_once_when_the_reactor_is_not_running() -> None:
    # After the reactor stopped no timer fires, and twistd ends the process by its signal (no
    # exit handler runs): SIGTERM's last lines must not wait for either.
    import io

    from twisted.internet.task import Clock

    from cch.logs import make_observer

    out, clock = io.StringIO(), Clock()
    observer = make_observer(out, "json", batch=clock)
    observer({"log_format": "batched", "log_level": LogLevel.info, "log_time": 0.0, "log_namespace": "t"})
    assert out.getvalue() == ""
    clock.running = False  # type: ignore[attr-defined]
    observer({"log_format": "Server Shut Down.", "log_level": LogLevel.info, "log_time": 0.0, "log_namespace": "t"})
    assert [json.loads(line)["msg"] for line in out.getvalue().splitlines()] == ["batched", "Server Shut Down."]
    assert clock.getDelayedCalls() == []


# --- twistd -n cch: which observer, and fields shown ---------------------------------------


@pytest.mark.parametrize(
    ("argv", "logger"),
    [
        (["-n", "cch", "--demo"], "twistd_text_observer"),
        (["-n", "--logfile", "-", "cch", "--demo"], "twistd_text_observer"),
        (["-n", "--logger", "cch.logs.twistd_observer", "cch", "--demo"], "twistd_observer"),
        (["-n", "--logfile", "cch.log", "cch", "--demo"], None),  # twistd's own file observer
        (["-n", "--syslog", "cch", "--demo"], None),
        (["cch", "--demo"], None),  # a daemon logs to twistd.log, as twistd does
    ],
)
def test_plain_twistd_logs_with_our_observer_unless_told_where_logs_go(
    argv: list[str], logger: str | None
) -> None:
    from twisted.scripts.twistd import ServerOptions

    import cch.logs

    options = ServerOptions()
    options.parseOptions(argv)
    expected = None if logger is None else getattr(cch.logs, logger)
    assert options["logger"] is expected


TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
CCH = "from cch.cli import main; main()"
LOOPBACK = "tcp:0:interface=127.0.0.1"


def output_until(code: str, args: list[str], pattern: str, env: dict[str, str], cwd: Path, *, tty: bool) -> str:
    """Run ``python -c code args`` (its output on a pseudo-terminal, or a pipe) until a line
    matches ``pattern`` (30 s at most), then SIGTERM it; its output so far."""
    argv = [sys.executable, "-c", code, *args]
    environment = {"PATH": os.environ.get("PATH", os.defpath), **env}
    if tty:
        reading, writing = pty.openpty()
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=writing, stderr=writing, env=environment, cwd=cwd)
        os.close(writing)
    else:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment, cwd=cwd)
        assert child.stdout is not None
        reading = child.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + 30
    try:
        while re.search(pattern, seen.decode("utf-8", "replace").replace("\r\n", "\n"), re.M) is None:
            ready, _, _ = select.select([reading], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no line matching {pattern!r} within 30 s:\n{seen.decode(errors='replace')}"
            try:
                chunk = os.read(reading, 65536)
            except OSError:  # a pseudo-terminal whose child has gone
                chunk = b""
            assert chunk, f"ended without a line matching {pattern!r}:\n{seen.decode(errors='replace')}"
            seen += chunk
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        if tty:
            os.close(reading)
        elif child.stdout is not None:
            child.stdout.close()
    return seen.decode("utf-8", "replace").replace("\r\n", "\n")


LISTENING_TEXT = r"^\d\d:\d\d:\d\d\.\d{3} INFO server_listening hostname=127\.0\.0\.1 port=\d+ tunnel=in-process"
DEMO_READY_TEXT = r"^\S+ INFO demo_ready url=ws://127\.0\.0\.1:\d+/v1/responses$"  # logged after it


def test_twistd_n_cch_shows_each_events_fields(tmp_path: Path) -> None:
    output = output_until(TWISTD, ["-n", "--pidfile=", "cch", "--demo", "--listen", LOOPBACK], DEMO_READY_TEXT, {}, tmp_path, tty=False)
    assert re.search(LISTENING_TEXT, output, re.M), output
    assert "] server_listening\n" not in output  # not twistd's own format, which drops the fields


def test_cch_on_a_terminal_shows_each_events_fields(tmp_path: Path) -> None:
    output = output_until(CCH, ["--demo", "--listen", LOOPBACK], DEMO_READY_TEXT, {}, tmp_path, tty=True)
    assert re.search(LISTENING_TEXT, output, re.M), output


def test_twistd_n_cch_with_json_logs_writes_json_lines_as_before(tmp_path: Path) -> None:
    output = output_until(
        TWISTD,
        ["-n", "--pidfile=", "cch", "--demo", "--listen", LOOPBACK],
        r'^\{.*"msg":"server_listening"',
        {"CCH_LOG_FORMAT": "json"},
        tmp_path,
        tty=True,
    )
    (line,) = [line for line in output.splitlines() if '"msg":"server_listening"' in line]
    record = json.loads(line)
    assert (record["level"], record["ns"], record["hostname"], record["tunnel"]) == ("info", "cch.service", "127.0.0.1", "in-process")
    assert isinstance(record["port"], int)
