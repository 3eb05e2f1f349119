"""An echo-mode client edge, for RFC 6455 conformance runs (``scripts/conformance.sh``).

The Autobahn|Testsuite fuzzing client checks a server by having it echo what it is sent.
The real edge answers frames with turns, so this module swaps exactly one thing: the
protocol's ``onMessage`` echoes text and binary messages back. Text goes back through the
production frame writer (``EdgeProtocol.send_text``, which compresses with permessage-deflate
when it was negotiated), binary through Autobahn's ``sendMessage``. Everything else is
production's:

* :class:`EchoEdgeFactory` *is* an :class:`~cch.edge.factory.EdgeFactory`, built by
  ``EdgeFactory.__init__`` from the same :class:`~cch.config.LimitsConfig`, so its protocol
  options (payload limits, ``failByDrop``, ``echoCloseCodeReason``, auto-ping, close and
  open handshake timeouts, how permessage-deflate offers are answered) cannot drift.
* :class:`EchoEdgeProtocol` is an :class:`~cch.edge.protocol.EdgeProtocol`: the same
  subprotocol choice, close-frame and connection-failure hooks, the same 1011 path when the
  handler raises.
* :func:`main` serves it through :func:`cch.web.build_root`, so an upgrade goes through
  ``UpgradeResource`` (the upgrade half of production's ``ResponsesResource``) and its
  ``WebSocketResource`` at ``/v1/responses`` as in production.

Run: ``python -m cch.edge.conformance --port 9001`` (``--port 0`` picks a free port;
``--ready-file`` writes ``{"port": ..., "compression": ...}`` once listening).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, cast

from autobahn.websocket.compress import PerMessageDeflateOffer
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Site

from cch.config import LimitsConfig
from cch.drain import Drain
from cch.edge.factory import EdgeFactory
from cch.edge.protocol import EdgeProtocol
from cch.handler.auth import KeyRing
from cch.turn import ResponseSink, TurnRequest
from cch.web import UpgradeResource, build_root

log = Logger()

class NoTunnel:
    """The echo edge runs no turns; a call here is a bug in the conformance setup."""

    def run_turn(self, turn: TurnRequest, sink: ResponseSink) -> Any:
        raise RuntimeError("the conformance echo edge runs no turns")


class EchoEdgeProtocol(EdgeProtocol):
    """:class:`EdgeProtocol` whose messages are echoed instead of starting turns."""

    def _open(self) -> None:
        # As production does: twisted.web's HTTPChannel is the transport's producer until
        # the upgrade; the connection is ours now. No EdgeConnection: nothing runs turns.
        transport = self.transport
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        self.factory.connection_opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            # Autobahn (or cch.wsframes) has already checked UTF-8 and the size limits, of the
            # inflated message when it was compressed.
            if isBinary:
                self.sendMessage(payload, isBinary=True)
            else:
                self.send_text(payload.decode("utf-8"))  # the frames the real edge writes
        except Exception as exc:
            self._handler_crashed(exc)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        super().onClose(wasClean, code, reason)
        self.factory.connection_closed(self)


class EchoEdgeFactory(EdgeFactory):
    """:class:`EdgeFactory` with the echo protocol; options come from ``EdgeFactory.__init__``."""

    protocol = EchoEdgeProtocol


def build_echo_factory(limits: LimitsConfig | None = None, reactor: Any = None) -> EchoEdgeFactory:
    """The echo edge's factory, built like the gateway's (same limits, same options)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return EchoEdgeFactory(
        tunnel=NoTunnel(),
        limits=limits if limits is not None else LimitsConfig(),
        clock=reactor,
        reactor=reactor,
    )


def compression_accepted(factory: EdgeFactory) -> bool:
    """Whether the edge would accept a plain permessage-deflate offer (RFC 7692)."""
    return factory.perMessageCompressionAccept([PerMessageDeflateOffer()]) is not None


def build_site(factory: EdgeFactory) -> Site:
    """The production resource tree (``cch.web.build_root``) around ``factory``: upgrades on
    ``/v1/responses`` go through ``UpgradeResource`` and its ``WebSocketResource``. No client
    keys (loopback only), WebSocket mode on, never draining; besides ``/healthz`` no other
    endpoint is served (no POST turns, no models, no metrics)."""
    upgrades = UpgradeResource(factory, keys=KeyRing(()), drain=Drain(), websocket_enabled=True)
    site = Site(build_root(upgrades))
    site.displayTracebacks = False
    return site


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cch.edge.conformance",
        description="Serve the cch client edge in echo mode at ws://HOST:PORT/v1/responses.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9001, help="TCP port; 0 picks a free one (default 9001)")
    parser.add_argument(
        "--ready-file",
        help='once listening, write {"port": N, "compression": bool} here (atomically)',
    )
    parser.add_argument("--verbose", action="store_true", help="log to stderr")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    if args.verbose:
        from twisted.logger import globalLogBeginner, textFileLogObserver

        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])

    factory = build_echo_factory(reactor=reactor)
    port = cast(IListeningPort, reactor.listenTCP(args.port, build_site(factory), interface=args.host))  # type: ignore[attr-defined]
    bound = port.getHost().port  # type: ignore[attr-defined]
    compression = compression_accepted(factory)
    if args.ready_file:
        tmp = f"{args.ready_file}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"port": bound, "compression": compression}, f)
        os.replace(tmp, args.ready_file)
    print(
        f"cch conformance echo edge on ws://{args.host}:{bound}/v1/responses "
        f"(permessage-deflate {'accepted' if compression else 'refused'})",
        flush=True,
    )
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
