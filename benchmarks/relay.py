"""A bare TCP relay in front of the fake upstream: the floor of one more process in the path.

    python -m benchmarks.relay --upstream-port 8090 [--port 0]

Every accepted connection is joined to a new connection to the upstream and bytes are passed
both ways as they arrive (``twisted.protocols.portforward``, with each side the other's
producer): no parsing, no framing, no authentication, routing, pool, ledger or logs. A gateway
does all of these besides passing bytes on, so on the same machine it cannot beat this relay's
time to first event or throughput: the ``tcp-relay`` target shows how much of a gateway's
numbers is simply the second process and its two extra socket hops (docs/benchmarks.md).
Prints one JSON line ``{"ready": true, "port": N}`` once it listens. 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import sys

from twisted.internet import reactor
from twisted.protocols.portforward import ProxyClient, ProxyClientFactory, ProxyFactory, ProxyServer

from benchmarks.upstream import raise_nofile_limit


class _Upstream(ProxyClient):
    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # as Autobahn sets it on every WebSocket
        super().connectionMade()


class _UpstreamFactory(ProxyClientFactory):
    protocol = _Upstream
    noisy = False


class _Client(ProxyServer):
    clientProtocolFactory = _UpstreamFactory

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        super().connectionMade()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.relay", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--upstream-port", type=int, required=True, help="the fake upstream's port")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    factory = ProxyFactory("127.0.0.1", args.upstream_port)
    factory.protocol = _Client
    factory.noisy = False
    port = reactor.listenTCP(args.port, factory, backlog=1024, interface="127.0.0.1")
    print(json.dumps({"ready": True, "port": port.getHost().port}), flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
