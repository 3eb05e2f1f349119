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
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from autobahn.websocket.xormasker import create_xor_masker

_FIN_TEXT = 0x81


def take_text_frames(proto: Any, *, masked: bool, deliver: Callable[[bytes], bool | None]) -> None:
    """Deliver the complete, final text frames at the head of ``proto.data`` and drop them.

    ``masked`` says which frames are ours (a server reads masked frames, a client unmasked
    ones). ``deliver`` gets each unmasked payload and returns False to leave that frame to
    Autobahn (anything else takes it). Stops at the first frame of any other kind, or once the protocol is no longer
    open (a message may close it).
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
                break
            if proto.state != open_state:
                break
    finally:
        if pos:
            proto.data = data[pos:]


def text_frame_header(size: int) -> bytes:
    """The header of one final, unmasked text frame (what a server sends)."""
    if size < 126:
        return bytes((_FIN_TEXT, size))
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big")
    return b"\x81\x7f" + size.to_bytes(8, "big")


def masked_text_frame(payload: bytes) -> bytes:
    """One final text frame as a client sends it: masked with a fresh random key."""
    size = len(payload)
    if size < 126:
        header = bytes((_FIN_TEXT, 0x80 | size))
    elif size < 65536:
        header = b"\x81\xfe" + size.to_bytes(2, "big")
    else:
        header = b"\x81\xff" + size.to_bytes(8, "big")
    key = os.urandom(4)
    if size:
        payload = create_xor_masker(key, size).process(payload)
    return header + key + payload
