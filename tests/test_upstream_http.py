"""HttpUpstream.post: a request the gateway itself stops is never reported as the provider's
failure, however early it is stopped (reported by the soak)."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from cch.upstream.http import HttpUpstream, UpstreamTimeout


class Silent(Protocol):
    """Accepts and never answers."""


@pytest.mark.parametrize("turns_before_cancel", [0, 1, 2, 5])
@pytest_twisted.ensureDeferred
async def test_cancelling_at_any_moment_is_a_cancellation(turns_before_cancel: int) -> None:
    from twisted.internet.task import deferLater

    port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    upstream = HttpUpstream(reactor, Clock())
    try:
        d = upstream.post(
            f"http://127.0.0.1:{port.getHost().port}/v1/responses",
            {},
            b"{}",
            connect_timeout=5,
            first_byte_timeout=60,
        )
        for _ in range(turns_before_cancel):
            await deferLater(reactor, 0, lambda: None)
        d.cancel()
        with pytest.raises(CancelledError):
            await d
    finally:
        await upstream.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_first_byte_deadline_is_a_timeout() -> None:
    from twisted.internet.task import deferLater

    port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    clock = Clock()
    upstream = HttpUpstream(reactor, clock)
    try:
        d = upstream.post(
            f"http://127.0.0.1:{port.getHost().port}/v1/responses", {}, b"{}", connect_timeout=5, first_byte_timeout=7
        )
        await deferLater(reactor, 0, lambda: None)
        clock.advance(7)
        with pytest.raises(UpstreamTimeout, match="no response within 7s"):
            await d
    finally:
        await upstream.close()
        await port.stopListening()
