"""Incremental Server-Sent Events decoding and encoding (docs/reference-behaviour.md#sse-parsing).

Only the ``data:`` payload of each event matters to the gateway, so the decoder
returns one ``str`` per complete event and ignores ``event:``, ``id:``, ``retry:``
and comment lines.
"""

from __future__ import annotations

__all__ = ["EventTooLarge", "SSEDecoder", "encode_event"]

# What JavaScript's String.prototype.trim() removes (the reference trims data values
# with it): ECMAScript WhiteSpace and LineTerminator.  Python's str.strip() differs
# (it also strips U+001C..U+001F and U+0085, and keeps U+FEFF).
_JS_WHITESPACE = (
    "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)


class EventTooLarge(ValueError):
    """An event grew past the decoder's ``max_event_bytes``; the decoder dropped it."""

    def __init__(self, limit: int, events: list[str]) -> None:
        super().__init__(f"SSE event exceeded {limit} bytes")
        self.limit = limit
        #: The complete events that came before it in the same chunk, in order.
        self.events = events


class SSEDecoder:
    """Feed bytes in arbitrary fragments; get back the data text of each complete event.

    The event delimiter is a blank line (``\\n\\n``, ``\\r\\n\\r\\n`` or a mix).  To find
    it with a single ``bytes.find``, CRLF is normalised to LF as bytes arrive (a
    chunk-final ``\\r`` is held back until the next chunk shows whether a ``\\n``
    follows).  The search resumes from a remembered offset, so every byte is
    scanned once however the stream is fragmented.

    With ``max_event_bytes`` (0: no cap) an event longer than that, counted after CRLF
    normalisation and without its delimiter, raises :class:`EventTooLarge` from the
    :meth:`feed` that shows it, delimiter found or not: between calls the decoder never
    holds more than the cap, so a peer cannot make it buffer without bound.
    """

    __slots__ = ("_buf", "_scan", "_cr", "_limit")

    def __init__(self, max_event_bytes: int = 0) -> None:
        self._limit = max_event_bytes
        self._buf = bytearray()
        # Offset in _buf where the next delimiter search starts.
        self._scan = 0
        # A b"\r" that ended the previous chunk and is not yet in _buf.
        self._cr = False

    def feed(self, chunk: bytes) -> list[str]:
        """Buffer ``chunk`` and return the data of every event it completes."""
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._cr = True
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        if not chunk:
            return []
        buf = self._buf
        buf += chunk
        events: list[str] = []
        start = 0
        find = buf.find
        limit = self._limit
        end = find(b"\n\n", self._scan)
        while end >= 0:
            if limit and end - start > limit:
                self._too_large(events)
            data = _event_data(buf, start, end)
            if data is not None:
                events.append(data)
            start = end + 2
            end = find(b"\n\n", start)
        if start:
            del buf[:start]
        # The rest has no delimiter yet: one event so far (a trailing b"\n" may be the
        # first half of its delimiter, so it does not count).
        if limit and len(buf) > limit and len(buf) - (buf[-1] == 0x0A) > limit:
            self._too_large(events)
        # A trailing b"\n" may be the first half of the next delimiter.
        self._scan = max(len(buf) - 1, 0)
        return events

    @property
    def buffered(self) -> int:
        """Bytes held for the event in progress (never more than ``max_event_bytes``)."""
        return len(self._buf)

    def _too_large(self, events: list[str]) -> None:
        """Drop everything buffered (the memory goes at once) and report the oversized event."""
        self._buf.clear()
        self._scan = 0
        self._cr = False
        raise EventTooLarge(self._limit, events)

    def finish(self) -> list[str]:
        """At end of body, flush buffered text as a final event if it is not blank.

        Blank (whitespace-only) text has no ``data:`` line, so it yields nothing.
        The decoder is reset and may be reused.
        """
        buf = self._buf
        self._buf = bytearray()
        self._scan = 0
        self._cr = False
        data = _event_data(buf, 0, len(buf))
        return [] if data is None else [data]


def _event_data(buf: bytearray, start: int, end: int) -> str | None:
    """Return the joined ``data:`` values of ``buf[start:end]``, or None if it has none."""
    if buf.find(b"data:", start, end) < 0:
        return None
    text = buf[start:end].decode("utf-8", "replace")
    if text.startswith("data:") and "\n" not in text:
        return text[5:].strip(_JS_WHITESPACE)
    values = [
        line[5:].strip(_JS_WHITESPACE) for line in text.split("\n") if line.startswith("data:")
    ]
    return "\n".join(values) if values else None


def encode_event(data: str | bytes) -> bytes:
    """Encode ``data`` as one SSE event: a ``data:`` line per line of data, then a blank line."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return b"".join([b"data: " + line + b"\n" for line in raw.split(b"\n")]) + b"\n"
