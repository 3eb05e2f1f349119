"""Options and service construction behind ``twistd -n cch``."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.python import usage

from cch.config import Config, ConfigError, demo_config, load_config
from cch.service import GatewayService
from cch.service import makeService as make_gateway
from cch.usage.store import StoreError

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE | --demo] [--listen ENDPOINT]"
    longdesc = (
        "Run the cch gateway. --config reads a TOML file (see docs/configuration.md); "
        "--demo runs with a built-in fake upstream so you can try it offline."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        ["listen", "l", None, "Listen endpoint, e.g. tcp:8080:interface=127.0.0.1 (overrides the file)."],
    ]
    optFlags = [["demo", None, "Serve a built-in fake upstream as the only provider."]]

    def postOptions(self) -> None:
        logs_with_fields(self.parent)
        if self["demo"] and self["config"]:
            raise usage.UsageError("use either --config or --demo, not both")
        if not self["demo"]:
            # Validate now so a bad file stops start-up with one clear line.
            try:
                self.config = load_config(self["config"], os.environ, listen=self["listen"])
            except ConfigError as exc:
                raise usage.UsageError(str(exc)) from None


TEXT_LOGGER = "cch.logs.twistd_text_observer"


def logs_with_fields(twistd: Any) -> None:
    """Plain ``twistd -n cch`` logs with twistd's own observer, which prints our events' names
    (``server_listening``) without their fields. Unless twistd's command line chose where logs
    go (``--logger``, ``--logfile``, ``--syslog``, or a daemon's ``twistd.log``), log as ``cch``
    does: our text lines on stdout, fields shown (``CCH_LOG_FORMAT=json`` for JSON lines).
    ``twistd`` is twistd's own options, parsed before any logging starts."""
    if twistd is None or not twistd.get("nodaemon"):
        return
    if twistd.get("logger") or twistd.get("syslog") or twistd.get("logfile") not in (None, "", "-"):
        return
    twistd["logger"] = TEXT_LOGGER  # twistd imports it after parsing (ServerOptions.postOptions)


class DemoService(MultiService):
    """The gateway in front of an in-process fake upstream on an ephemeral loopback port."""

    def __init__(self, listen: str | None, reactor: Any) -> None:
        super().__init__()
        from cch.testing import FakeUpstream

        self.reactor = reactor
        self.listen = listen
        self.fake = FakeUpstream(reactor)
        self.gateway: GatewayService | None = None
        # Validate the overrides before twistd daemonizes, not after.
        demo_config("http://127.0.0.1:1/v1", os.environ, listen=listen)

    def startService(self) -> None:
        super().startService()
        self.fake.listen(self.reactor).addCallback(self._start_gateway)

    def _start_gateway(self, _: Any) -> None:
        config = demo_config(self.fake.base_url, os.environ, listen=self.listen)
        self.gateway = make_gateway(config, self.reactor)
        self.gateway.setServiceParent(self)
        self.gateway.when_listening().addCallback(lambda _: self._banner())

    def _banner(self) -> None:
        assert self.gateway is not None
        base = self.gateway.base_url
        ws = base.replace("http://", "ws://") + "/v1/responses"
        log.info("demo_ready", url=ws)
        print(
            f"cch demo is up: {ws}\n"
            "Codex CLI provider for ~/.codex/config.toml:\n"
            'model = "gpt-5.5"\n'
            'model_provider = "cch"\n'
            "[model_providers.cch]\n"
            'name = "cch"\n'
            f'base_url = "{base}/v1"\n'
            'wire_api = "responses"\n'
            "supports_websockets = true",
            flush=True,
        )

    def stopService(self) -> Any:
        d = super().stopService()
        d.addBoth(lambda _: self.fake.stop())
        return d


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    if options["demo"]:
        try:
            return DemoService(options["listen"], reactor)
        except ConfigError as exc:
            raise SystemExit(f"cch: {exc}") from None
    config: Config = options.config
    try:
        return make_gateway(config, reactor)
    except StoreError as exc:
        raise SystemExit(f"cch: {config.source}: usage.database: {exc}") from None
