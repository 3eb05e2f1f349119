"""`twistd -n cch-fake-upstream`: the fake Responses upstream as a standalone server, for demos
and benchmarks. Every request gets `codex_like` (declared in twisted/plugins/cch_plugin.py)."""

from __future__ import annotations

from twisted.application import strports
from twisted.application.service import IService
from twisted.python import usage
from twisted.web.server import Site

from cch.testing.fake_upstream import FakeUpstream


class Options(usage.Options):
    """Command-line options of the cch-fake-upstream plugin."""

    synopsis = "[--listen ENDPOINT]"
    optParameters = [
        [
            "listen",
            "l",
            "tcp:8090:interface=127.0.0.1",
            "Endpoint to serve on (a Twisted endpoint description).",
        ],
    ]


def makeService(options: Options) -> IService:
    """A service serving a fresh FakeUpstream on the configured endpoint."""
    site = Site(FakeUpstream().resource())
    return strports.service(options["listen"], site)
