"""Structured log output: one JSON object per line (docs/reference-behaviour.md#log-events).

Our events use a stable event name as the ``twisted.logger`` format string and
carry their data as fields, e.g. ``log.info("ws_client_connected", path=masked)``.
Events from Twisted and other libraries use real format strings; those are
rendered to text instead of dumping their (often unserialisable) fields.
"""

from __future__ import annotations

import atexit
import functools
import json
import time
from collections.abc import Callable
from typing import Any, TextIO
from urllib.parse import parse_qsl, quote, urlencode, urljoin, urlsplit

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, InvalidLogLevelError, LogEvent, LogLevel, formatEvent
from twisted.web.iweb import IAccessLogFormatter
from zope.interface import implementer, provider

__all__ = [
    "JsonLinesObserver",
    "TextLinesObserver",
    "access_log_formatter",
    "json_line",
    "make_observer",
    "mask_query",
    "mask_url",
    "text_line",
    "twistd_observer",
    "twistd_text_observer",
]

_MASK = "***"
_DUMMY_ORIGIN = "http://localhost/"
# Path characters left alone; the rest are percent-encoded like a WHATWG URL path.
_PATH_SAFE = "/%!$&'()*+,;=:@[]\\^|-._~"
# Field names whose lower-cased, punctuation-free form ends like this are masked
# (authorization, api_key, apiKey, x-api-key, key, secret, internalSecret, token, ...).
_SENSITIVE_SUFFIXES = ("authorization", "key", "secret", "token", "password", "cookie")
# Keys of the JSON line itself; event fields with these names are prefixed with "_".
_HEAD_KEYS = frozenset({"ts", "level", "msg", "ns"})
_LEVEL_NAMES = frozenset(level.name for level in LogLevel.iterconstants())
_JSON_OPTS: dict[str, Any] = {"separators": (",", ":"), "ensure_ascii": False, "allow_nan": False}
# Built once: json.dumps with options builds a new encoder on every call.
_encode_record = json.JSONEncoder(default=lambda value: _safe_repr(value), **_JSON_OPTS).encode

try:  # about ten times faster, when installed (pip install 'cch[fast]')
    from orjson import dumps as _fast_encode
except ImportError:
    _fast_encode = None  # type: ignore[assignment]


def mask_query(url: str | bytes | None) -> str:
    """Return the URL path with every query value except ``model`` replaced by ``***``.

    Query strings can carry credentials (``?api_key=...``), so a logged URL keeps
    the keys (useful for debugging) but not their values.
    """
    if isinstance(url, bytes):
        url = url.decode("utf-8", "replace")
    if not isinstance(url, str) or not url:
        return "/"
    try:
        parts = urlsplit(urljoin(_DUMMY_ORIGIN, url))
        path = quote(parts.path, safe=_PATH_SAFE) or "/"
        pairs = [
            (key, value if key.lower() == "model" else _MASK)
            for key, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        query = urlencode(pairs, safe="*")
    except Exception:
        return "/"
    return f"{path}?{query}" if query else path


def mask_url(url: str | bytes) -> str:
    """A full URL (a Referer) with its userinfo dropped and its query masked (mask_query)."""
    if isinstance(url, bytes):
        url = url.decode("utf-8", "replace")
    try:
        parts = urlsplit(url)
        if parts.scheme and parts.netloc:
            host = parts.netloc.rpartition("@")[2]
            return f"{parts.scheme}://{host}{mask_query(url)}"
    except ValueError:
        return "-"
    return mask_query(url)


# Access-log field bytes: printable ASCII as is, ``\\`` and ``"`` escaped, any other byte as
# ``\\xNN``, so nothing in a field can end its quotes or the line.
_LOG_FIELD_BYTES = [
    "\\" + chr(byte) if byte in (0x22, 0x5C) else chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}"
    for byte in range(256)
]


def _escaped(value: str | bytes | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    return "".join([_LOG_FIELD_BYTES[byte] for byte in value])


@provider(IAccessLogFormatter)
def access_log_formatter(timestamp: str, request: Any) -> str:
    """``twisted.web`` access-log line (``Site(logFormatter=...)``) in the combined format of
    ``twisted.web.http.combinedLogFormatter``, but with the request URI's query values and the
    Referer's userinfo and query values masked, since either can carry a key."""
    address = request.getClientAddress()
    ip = address.host if isinstance(address, (IPv4Address, IPv6Address)) else "-"
    referrer = request.getHeader(b"referer")
    agent = request.getHeader(b"user-agent")
    return '"{}" - - {} "{} {} {}" {:d} {} "{}" "{}"'.format(
        _escaped(ip),
        timestamp,
        _escaped(request.method),
        _escaped(mask_query(request.uri)),  # the path, query values masked
        _escaped(request.clientproto),
        request.code,
        request.sentLength or "-",
        _escaped(mask_url(referrer)) if referrer else "-",
        _escaped(agent) if agent else "-",
    )


@functools.lru_cache(maxsize=1024)
def _is_sensitive(name: str) -> bool:
    normal = "".join(c for c in name.lower() if c.isalnum())
    return normal.endswith(_SENSITIVE_SUFFIXES)


def _iso_utc(t: float) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``, like JavaScript's ``toISOString``."""
    seconds = int(t // 1)
    millis = min(int((t - seconds) * 1000), 999)
    return _utc_second(seconds) + f".{millis:03d}Z"


@functools.lru_cache(maxsize=4)
def _utc_second(seconds: int) -> str:
    # A busy gateway writes many lines per second; the formatted second is shared.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def _level_name(event: LogEvent) -> str:
    name = getattr(event.get("log_level"), "name", None)
    return name if name in _LEVEL_NAMES else "info"


def _failure_text(event: LogEvent) -> str | None:
    failure = event.get("log_failure")
    if failure is None:
        return None
    value = getattr(failure, "value", failure)
    try:
        text = str(value)
    except Exception:
        text = ""
    return text or type(value).__name__


def _message_and_fields(event: LogEvent) -> tuple[str, dict[str, Any]]:
    """Return the message and the (masked) fields to show for ``event``."""
    fmt = event.get("log_format")
    if fmt is not None and not isinstance(fmt, str):
        fmt = str(fmt)
    if fmt is not None and "{" in fmt:
        return formatEvent(event), {}
    fields: dict[str, Any] = {}
    for key, value in event.items():
        if not isinstance(key, str) or key.startswith("log_"):
            continue
        if _is_sensitive(key):
            value = _MASK
        fields["_" + key if key in _HEAD_KEYS else key] = value
    return fmt or "", fields


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def _dumps(record: dict[str, Any]) -> str:
    if _fast_encode is not None:
        try:
            return _fast_encode(record, default=_safe_repr).decode("utf-8")
        except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
            pass  # NaN, a lone surrogate, a huge integer...: as without orjson
    try:
        return _encode_record(record)
    except (TypeError, ValueError, RecursionError):
        pass
    # Some field is not serialisable even with repr (NaN, a cycle, non-str keys):
    # fall back field by field.
    clean: dict[str, Any] = {}
    for key, value in record.items():
        try:
            json.dumps(value, default=_safe_repr, **_JSON_OPTS)
        except (TypeError, ValueError, RecursionError):
            value = _safe_repr(value)
        clean[key] = value
    return json.dumps(clean, default=_safe_repr, **_JSON_OPTS)


def json_line(event: LogEvent) -> str | None:
    """Render one ``twisted.logger`` event as one compact JSON line (no newline).

    Returns None for an event with nothing to say (no message, fields or failure).
    Never raises: a rendering error yields a ``log_render_failed`` line instead.
    """
    try:
        msg, fields = _message_and_fields(event)
        error = _failure_text(event)
        if not msg and error is None and not fields:
            return None
        record: dict[str, Any] = {
            "ts": _iso_utc(event.get("log_time") or time.time()),
            "level": _level_name(event),
            "msg": msg,
            "ns": event.get("log_namespace"),
        }
        record.update(fields)
        if error is not None:
            record["error"] = error
        return _dumps(record)
    except Exception as e:
        return json.dumps(
            {
                "ts": _iso_utc(time.time()),
                "level": "error",
                "msg": "log_render_failed",
                "error": _safe_repr(e),
            },
            **_JSON_OPTS,
        )


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in "\"'=" for c in value):
        return value
    try:
        return json.dumps(value, default=_safe_repr, **_JSON_OPTS)
    except (TypeError, ValueError, RecursionError):
        return _safe_repr(value)


def text_line(event: LogEvent) -> str:
    """Render ``event`` for a human at a terminal: ``HH:MM:SS.mmm LEVEL msg key=value ...``.

    Uses local time.  Never raises.
    """
    try:
        msg, fields = _message_and_fields(event)
        error = _failure_text(event)
        if error is not None:
            fields["error"] = error
        t = event.get("log_time") or time.time()
        millis = min(int(t % 1 * 1000), 999)
        stamp = time.strftime("%H:%M:%S", time.localtime(t)) + f".{millis:03d}"
        parts = [stamp, _level_name(event).upper(), msg]
        parts.extend(f"{key}={_text_value(value)}" for key, value in fields.items())
        return " ".join(parts)
    except Exception as e:
        return f"log_render_failed error={_safe_repr(e)}"


@implementer(ILogObserver)
class _LineObserver:
    """Write each event at or above ``min_level`` as one line of text to ``out``."""

    _render: Callable[[LogEvent], str | None]

    def __init__(
        self, out: TextIO, min_level: LogLevel = LogLevel.info, *, batch: IReactorTime | None = None
    ) -> None:
        self._out = out
        # Set lookups: comparing LogLevel constants walks their list on every event.
        self._dropped = frozenset(level for level in LogLevel.iterconstants() if level < min_level)
        # With ``batch`` (a clock), events are rendered and written a moment later, together:
        # a turn's log lines then cost nothing before its first event reaches the client.
        self._batch = batch
        self._pending: list[LogEvent] = []
        self._flush_call: Any = None
        if batch is not None:
            atexit.register(self.flush)

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level", LogLevel.info)
        if level in self._dropped:
            return
        if self._batch is None or not getattr(self._batch, "running", True):
            # No batching once the reactor has stopped: no timer would fire, and twistd ends
            # the process by its signal, so no exit handler runs either.
            self.flush()
            self._write([event])
            return
        self._pending.append(event)
        if len(self._pending) >= _BATCH_LINES or level in _URGENT:
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self._batch.callLater(_BATCH_SECONDS, self.flush)

    def flush(self) -> None:
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        pending, self._pending = self._pending, []
        if pending:
            self._write(pending)

    def _write(self, events: list[LogEvent]) -> None:
        lines = [line for line in map(self._render, events) if line is not None]
        if not lines:
            return
        # Flush at once: stdout is block-buffered when it is a pipe (containers), and a log
        # line that sits in a buffer is no use when the process dies.
        self._out.write("\n".join(lines) + "\n")
        self._out.flush()


class JsonLinesObserver(_LineObserver):
    """An ``ILogObserver`` writing one JSON object per line (see :func:`json_line`)."""

    _render = staticmethod(json_line)


class TextLinesObserver(_LineObserver):
    """An ``ILogObserver`` writing human-readable lines (see :func:`text_line`)."""

    _render = staticmethod(text_line)


def _parse_level(name: str) -> LogLevel:
    try:
        return LogLevel.levelWithName(name.strip().lower())
    except InvalidLogLevelError:
        names = ", ".join(sorted(_LEVEL_NAMES))
        raise ValueError(f"log level must be one of {names}, not {name!r}") from None


def make_observer(
    out: TextIO, fmt: str = "auto", min_level: str | LogLevel = "info", *, batch: IReactorTime | None = None
) -> ILogObserver:
    """Build the log observer for ``out``: ``fmt`` is ``"json"``, ``"text"`` or ``"auto"``.

    ``auto`` picks text for a terminal and JSON otherwise (log collectors).
    """
    level = _parse_level(min_level) if isinstance(min_level, str) else min_level
    if fmt == "auto":
        try:
            fmt = "text" if out.isatty() else "json"
        except (AttributeError, ValueError):
            fmt = "json"
    if fmt == "json":
        return JsonLinesObserver(out, level, batch=batch)
    if fmt == "text":
        return TextLinesObserver(out, level, batch=batch)
    raise ValueError(f"log format must be 'json', 'text' or 'auto', not {fmt!r}")


_BATCH_SECONDS = 0.05
_BATCH_LINES = 256
_URGENT = frozenset((LogLevel.error, LogLevel.critical))  # written at once, with what is pending


def twistd_observer() -> ILogObserver:
    """Observer factory for ``twistd --logger cch.logs.twistd_observer`` (what ``cch`` runs):
    JSON lines (or text on a terminal) on stdout; ``CCH_LOG_FORMAT`` (json|text|auto) and
    ``CCH_LOG_LEVEL`` pick."""
    return _stdout_observer("auto")


def twistd_text_observer() -> ILogObserver:
    """What plain ``twistd -n cch`` logs with when its command line says nothing of logs
    (cch.plugin sets it): twistd's own observer prints our events' names without their fields.
    Text, as twistd's would be, unless ``CCH_LOG_FORMAT`` says otherwise."""
    return _stdout_observer("text")


def _stdout_observer(default_format: str) -> ILogObserver:
    import os
    import sys

    from twisted.internet import reactor

    observer = make_observer(
        sys.stdout,
        os.environ.get("CCH_LOG_FORMAT", default_format),
        os.environ.get("CCH_LOG_LEVEL", "info"),
        batch=reactor,
    )
    # What is still batched when the reactor stops is written then (SIGTERM's last lines).
    reactor.addSystemEventTrigger("after", "shutdown", observer.flush)  # type: ignore[attr-defined]
    return observer
