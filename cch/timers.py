"""Autobahn's protocol timers (pings, close handshakes) on the injected clock, and cleaned up."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from txaio._common import _BatchedTimer


def batched_timer(clock: IReactorTime) -> Any:
    """What Autobahn factories use for their timers, driven by ``clock``."""
    return _BatchedTimer(200, 1000, seconds_provider=clock.seconds, delayed_call_creator=clock.callLater)


def cancel_close_timer(protocol: Any) -> None:
    """Autobahn leaves its close-handshake timer behind when the TCP dies mid-close."""
    call = getattr(protocol, "closeHandshakeTimeoutCall", None)
    if call is not None:
        try:
            call.cancel()
        except Exception:
            pass
        protocol.closeHandshakeTimeoutCall = None
