"""WebSocket text frames on the hot path, ahead of Autobahn's general machinery.

Every turn is one small text message in and dozens of small text messages out, each one
final frame. Autobahn's receive path (a frame-header object, a masker, a UTF-8 validator,
message bookkeeping and a callback chain per frame) and send path (statistics, options, a
masker object) cost more than the frames themselves. The functions here handle exactly the
common frames and leave everything else in Autobahn's buffer, so Autobahn keeps the whole
protocol: control frames, fragments, partial frames, RSV bits, 64-bit lengths, oversized
frames and invalid UTF-8 (which it fails with the right close code).

The protocol state read and written here (``data``, Autobahn's read buffer, the payload limits,
``state``) is Autobahn's undocumented internals, read inline because a helper would cost a call
per frame; cch/adapters.py lists it and tests/test_adapters.py checks it is still there.

permessage-deflate (RFC 7692, docs/configuration.md): Autobahn negotiates it and inflates every
compressed frame. A compressed frame has RSV1 set, so its first byte is never the plain final
text frame's ``0x81`` and :func:`take_text_frames` always leaves it to Autobahn, whose inflater
counts the *inflated* size against ``maxMessagePayloadSize`` (a zip bomb is refused with 1009
before it is inflated past the limit). The frames cch writes itself are compressed, when the
extension was negotiated, with the connection's own Autobahn compressor
(:class:`MessageDeflater`), so the zlib stream and its window are the one Autobahn would use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from autobahn.websocket.compress import (
    PerMessageDeflate,
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from autobahn.websocket.xormasker import create_xor_masker

from cch.jsoncodec import object_type

_FIN_TEXT = 0x81
_FIN_TEXT_COMPRESSED = 0xC1  # RSV1: the payload is compressed (RFC 7692 section 6)


def take_text_frames(proto: Any, *, masked: bool, deliver: Callable[[bytes], bool | None]) -> bool:
    """Deliver the complete, final text frames at the head of ``proto.data`` and drop them.

    ``masked`` says which frames are ours (a server reads masked frames, a client unmasked
    ones). ``deliver`` gets each unmasked payload and returns False to leave that frame to
    Autobahn (anything else takes it). Stops at the first frame of any other kind, or once the protocol is no longer
    open (a message may close it).

    True when what is left is the start of a frame this path takes once the rest arrives (or
    nothing): the caller waits for the next read instead of handing it to Autobahn, which
    would then parse that frame and every one after it in the same read the slow way.
    """
    data: bytes = proto.data
    size = len(data)
    limit = proto.maxFramePayloadSize
    message_limit = proto.maxMessagePayloadSize
    if 0 < message_limit < limit or not limit:
        limit = message_limit
    mask_bit = 0x80 if masked else 0
    open_state = proto.STATE_OPEN
    pos = 0
    try:
        while size - pos >= 2 and data[pos] == _FIN_TEXT:
            second = data[pos + 1]
            if second & 0x80 != mask_bit:
                break
            length = second & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126 and size - pos >= 4:
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126:
                    break  # not minimally encoded: Autobahn fails the connection
                start = pos + 4
            else:
                break
            if masked:
                key = data[start : start + 4]
                start += 4
            end = start + length
            if end > size or 0 < limit < length:
                break
            payload = data[start:end]
            if masked and length:
                payload = create_xor_masker(key, length).process(payload)
            frame_start, pos = pos, end
            if deliver(payload) is False:
                pos = frame_start
                return False
            if proto.state != open_state:
                return False
        return _frame_to_come(data, pos, mask_bit, limit)
    finally:
        if pos:
            proto.data = data[pos:]


def _frame_to_come(data: bytes, pos: int, mask_bit: int, limit: int) -> bool:
    """Is ``data[pos:]`` empty, or the incomplete start of a final text frame the fast path
    takes once complete (the right mask bit, a 7- or minimal 16-bit length within ``limit``)?"""
    left = len(data) - pos
    if left == 0:
        return True
    if data[pos] != _FIN_TEXT:
        return False
    if left == 1:
        return True
    second = data[pos + 1]
    if second & 0x80 != mask_bit:
        return False
    length = second & 0x7F
    header = 2
    if length == 126:
        if left < 4:
            return True
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 126:
            return False
        header = 4
    elif length == 127:
        return False
    if 0 < limit < length:
        return False
    return left < header + (4 if mask_bit else 0) + length


class FrameRelay(Protocol):
    """Who takes an upstream server's frames whole (cch.upstream.exchange, the edge's turn)."""

    def relay_frames(self, data: bytes, start: int, end: int, count: int, size: int) -> None:
        """``data[start:end]`` is ``count`` complete final text frames exactly as an upstream
        server sent them (unmasked, uncompressed), ``size`` bytes of payload in all; each is a
        JSON object event of a type nobody in the gateway reads (:func:`relay_text_frames`)."""

    def keep(self, payload: bytes) -> None:
        """A copy of one event about to be relayed, of a type the relay keeps (valid UTF-8, a
        JSON object): the edge holds a response's output items for an interrupt it may have
        to answer itself."""


def relay_text_frames(
    proto: Any,
    deliver: Callable[[bytes], bool | None],
    relay_of: Callable[[], FrameRelay | None],
    read_types: frozenset[str],
    kept_types: frozenset[str] = frozenset(),
) -> bool:
    """:func:`take_text_frames` for a client (unmasked frames) whose events mostly go on as
    they came: runs of frames nobody needs to read are handed to the relay ``relay_of()``
    returns, header and payload, without being decoded again (a server's frames are unmasked on
    both hops, so the client gets the very bytes); every other frame's payload goes to
    ``deliver``, in order. ``relay_of`` is asked again after each delivered frame (a terminal
    event ends the turn, and with it the relay). A relayed frame of a type in ``kept_types``
    is also handed to the relay's ``keep``, in order, before the run that carries it.

    A frame is relayed only when it is what the edge would forward byte for byte anyway: a JSON
    object (valid UTF-8, valid JSON) whose ``type`` is a string not in ``read_types``. Anything
    else — a terminal, malformed data the edge wraps as text — is delivered as before.
    """
    data: bytes = proto.data
    size = len(data)
    limit = proto.maxFramePayloadSize
    message_limit = proto.maxMessagePayloadSize
    if 0 < message_limit < limit or not limit:
        limit = message_limit
    open_state = proto.STATE_OPEN
    relay = relay_of()
    pos = run_start = run_count = run_bytes = 0
    try:
        while size - pos >= 2 and data[pos] == _FIN_TEXT:
            length = data[pos + 1]
            if length < 126:
                start = pos + 2
            elif length == 126 and size - pos >= 4:
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126:
                    break  # not minimally encoded: Autobahn fails the connection
                start = pos + 4
            else:
                break  # masked (not a server's), 64-bit lengths, or the header is incomplete
            end = start + length
            if end > size or 0 < limit < length:
                break
            payload = data[start:end]
            if relay is not None and payload[:1] == b"{":
                kind = object_type(payload)
                if kind is not None and kind not in read_types:
                    if kind in kept_types:
                        relay.keep(payload)
                    if not run_count:
                        run_start = pos
                    run_count += 1
                    run_bytes += length
                    pos = end
                    continue
            if run_count:
                assert relay is not None
                relay.relay_frames(data, run_start, pos, run_count, run_bytes)
                run_count = run_bytes = 0
                if proto.state != open_state:
                    break
            frame_start, pos = pos, end
            if deliver(payload) is False:
                pos = frame_start
                return False
            if proto.state != open_state:
                return False
            relay = relay_of()
        if run_count:
            assert relay is not None
            relay.relay_frames(data, run_start, pos, run_count, run_bytes)
        if proto.state != open_state:
            return False
        return _frame_to_come(data, pos, 0, limit)
    finally:
        if pos:
            proto.data = data[pos:]


def frame_payloads(data: bytes, start: int, end: int) -> Iterator[bytes]:
    """The payloads of the complete, unmasked, uncompressed frames ``data[start:end]`` (as
    :func:`relay_text_frames` hands them over)."""
    pos = start
    while pos < end:
        length = data[pos + 1]
        if length < 126:
            begin = pos + 2
        elif length == 126:
            begin = pos + 4
            length = (data[pos + 2] << 8) | data[pos + 3]
        else:
            begin = pos + 10
            length = int.from_bytes(data[pos + 2 : pos + 10], "big")
        pos = begin + length
        yield data[begin:pos]


def text_frame_header(size: int, compressed: bool = False) -> bytes:
    """The header of one final, unmasked text frame (what a server sends); ``compressed`` sets
    RSV1 (the payload is a permessage-deflate message)."""
    first = _FIN_TEXT_COMPRESSED if compressed else _FIN_TEXT
    if size < 126:
        return bytes((first, size))
    if size < 65536:
        return bytes((first, 126)) + size.to_bytes(2, "big")
    return bytes((first, 127)) + size.to_bytes(8, "big")


def masked_text_frame(payload: bytes, compressed: bool = False) -> bytes:
    """One final text frame as a client sends it: masked with a fresh random key;
    ``compressed`` sets RSV1 (the payload is a permessage-deflate message)."""
    first = _FIN_TEXT_COMPRESSED if compressed else _FIN_TEXT
    size = len(payload)
    if size < 126:
        header = bytes((first, 0x80 | size))
    elif size < 65536:
        header = bytes((first, 0xFE)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, 0xFF)) + size.to_bytes(8, "big")
    key = os.urandom(4)
    if size:
        payload = create_xor_masker(key, size).process(payload)
    return header + key + payload


# -- permessage-deflate (RFC 7692) ----------------------------------------------------------

def memory_level(window_bits: int) -> int:
    """zlib's ``memLevel`` for a compressor of ``window_bits``: 4 (zlib's default is 8), less for
    windows under 4 KiB. A compressor holds ``2**(window_bits + 2) + 2**(memLevel + 9)`` bytes:
    with 32 KiB windows about 144 KiB instead of 256 KiB, for about 1% less compression and 15%
    more time per message on a turn's events (docs/benchmarks.md, "permessage-deflate")."""
    return max(1, min(4, window_bits - 8))


def refuse_compression(offers: list[Any]) -> None:
    """A server factory's ``perMessageCompressionAccept`` that accepts nothing."""
    return None


@dataclass(frozen=True)
class DeflateAccept:
    """A server factory's ``perMessageCompressionAccept``: the client's first
    permessage-deflate offer, accepted within ``window_bits``.

    Our compressor (server to client) uses at most ``window_bits`` (less if the client asks);
    the client is asked to compress with at most ``window_bits`` too when its offer allows it
    (``client_max_window_bits``), which bounds our inflater; a client that does not allow it
    may use 32 KiB windows, as RFC 7692 lets it. Context takeover stays on unless the client
    asks otherwise: Codex repeats its instructions and tools in every frame and a Responses
    upstream echoes them in three events of every turn, and with the previous copy in the
    window a repeat costs a few bytes (docs/benchmarks.md, "permessage-deflate").
    ``max_message_bytes`` (0: none) caps the inflated size of one message, as Autobahn's
    ``maxMessagePayloadSize`` does."""

    window_bits: int
    max_message_bytes: int = 0

    def __call__(self, offers: list[Any]) -> PerMessageDeflateOfferAccept | None:
        for offer in offers:
            if isinstance(offer, PerMessageDeflateOffer):
                bits = self.window_bits
                asked = offer.request_max_window_bits
                return PerMessageDeflateOfferAccept(
                    offer,
                    request_max_window_bits=bits if offer.accept_max_window_bits else 0,
                    window_bits=min(bits, asked) if asked else bits,
                    mem_level=memory_level(bits),
                    max_message_size=self.max_message_bytes or None,
                )
        return None


@dataclass(frozen=True)
class DeflateResponseAccept:
    """A client factory's ``perMessageCompressionAccept``: whatever the server answered to
    :func:`deflate_offers`, with our compressor (client to server) within ``window_bits`` and
    the inflated size of one message capped at ``max_message_bytes`` (0: none)."""

    window_bits: int
    max_message_bytes: int = 0

    def __call__(self, response: Any) -> PerMessageDeflateResponseAccept | None:
        if not isinstance(response, PerMessageDeflateResponse):
            return None
        bits = self.window_bits
        allowed = response.client_max_window_bits
        return PerMessageDeflateResponseAccept(
            response,
            window_bits=min(bits, allowed) if allowed else bits,
            mem_level=memory_level(bits),
            max_message_size=self.max_message_bytes or None,
        )


def deflate_offers(window_bits: int) -> list[PerMessageDeflateOffer]:
    """A client factory's ``perMessageCompressionOffers``: permessage-deflate, the server asked
    to compress with at most ``window_bits`` (which bounds our inflater)."""
    return [PerMessageDeflateOffer(request_max_window_bits=window_bits)]


def negotiated_deflate(proto: Any) -> MessageDeflater | None:
    """The compressor of an open connection that negotiated permessage-deflate, else None."""
    for extension in getattr(proto, "websocket_extensions_in_use", None) or ():
        if isinstance(extension, PerMessageDeflate):
            return MessageDeflater(extension)
    return None


class MessageDeflater:
    """Compresses one whole message with a connection's negotiated permessage-deflate context
    (Autobahn's own, so frames Autobahn sends and frames cch writes share one zlib stream,
    in the order they are written)."""

    __slots__ = ("_pmce",)

    def __init__(self, pmce: PerMessageDeflate) -> None:
        self._pmce = pmce

    def __call__(self, payload: bytes) -> bytes:
        pmce = self._pmce
        pmce.start_compress_message()
        return pmce.compress_message_data(payload) + pmce.end_compress_message()
