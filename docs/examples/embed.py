"""Embedding cch in your own Twisted application.

The host application owns the process and its top-level ``MultiService``; it runs its own
services (here a heartbeat that reports the gateway's load every minute) and attaches the gateway
built by ``cch.service.makeService(config, reactor)`` as one more child. Starting and stopping
the top-level service starts and stops everything, the gateway's graceful drain included.

Run it::

    python docs/examples/embed.py cch.toml      # a cch configuration file
    python docs/examples/embed.py --demo        # a built-in fake upstream as the only provider

In a ``.tac`` file or your own twistd plugin, ``make_application(config, reactor)`` is the whole
integration: ``make_application(...).setServiceParent(application)``.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cch.config import Config, ConfigError, demo_config, load_config
from cch.service import GatewayService, makeService

log = Logger()


class Heartbeat(TimerService):
    """The host's own service: every ``interval`` seconds (on ``clock``), note and log how busy
    the embedded gateway is."""

    def __init__(self, gateway: GatewayService, interval: float, clock: IReactorTime) -> None:
        super().__init__(interval, self.beat)
        self.clock = clock  # TimerService runs its LoopingCall on this
        self.gateway = gateway
        self.last: dict[str, int] | None = None

    def beat(self) -> None:
        self.last = {
            "connections": len(self.gateway.edge_factory.live),
            "turns_in_flight": self.gateway.handler.active,
        }
        log.info("app_heartbeat", **self.last)


def make_application(
    config: Config,
    reactor: Any,
    *,
    heartbeat_interval: float = 60.0,
    clock: IReactorTime | None = None,
) -> MultiService:
    """The host application: its heartbeat plus the cch gateway, as named child services
    (``"heartbeat"`` and ``"cch"``) of one ``MultiService``."""
    app = MultiService()
    gateway = makeService(config, reactor)
    gateway.setName("cch")
    gateway.setServiceParent(app)
    heartbeat = Heartbeat(gateway, heartbeat_interval, clock or reactor)
    heartbeat.setName("heartbeat")
    heartbeat.setServiceParent(app)
    return app


def main(argv: list[str] | None = None) -> None:
    """Run the host application until SIGINT/SIGTERM."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from cch.logs import make_observer

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: embed.py CONFIG.toml | --demo")
    globalLogBeginner.beginLoggingTo([make_observer(sys.stdout, "text")])

    def start(config: Config) -> MultiService:
        app = make_application(config, reactor)
        app.startService()
        gateway = app.getServiceNamed("cch")
        gateway.when_listening().addCallback(
            lambda _: print(f"cch is embedded and listening on {gateway.base_url}", flush=True)
        )
        return app

    if args[0] == "--demo":
        from cch.testing import FakeUpstream

        fake = FakeUpstream(reactor)

        def demo_started(_: object) -> None:
            app = start(demo_config(fake.base_url))
            reactor.addSystemEventTrigger("before", "shutdown", app.stopService)

        fake.listen(reactor).addCallback(demo_started)
        reactor.addSystemEventTrigger("before", "shutdown", fake.stop)
    else:
        try:
            config = load_config(args[0])
        except ConfigError as exc:
            raise SystemExit(f"embed.py: {exc}") from None
        app = start(config)
        reactor.addSystemEventTrigger("before", "shutdown", app.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
