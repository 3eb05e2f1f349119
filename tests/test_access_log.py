"""The ``twisted.web`` access log carries no key: ``cch.logs.access_log_formatter`` masks the
query values of the request URI and of the Referer (a key can ride in either, e.g.
``?api_key=sk-...``), in the combined log format Twisted writes by default."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import treq
from conftest import gateway_config, start_gateway
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.client import HTTPConnectionPool
from twisted.web.http import combinedLogFormatter
from twisted.web.resource import Resource
from twisted.web.server import Site

from cch.logs import access_log_formatter
from cch.testing import FakeUpstream

KEY = "sk-secret-value-123456"
PEER = IPv4Address("TCP", "192.0.2.7", 40000)


class Ok(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"ok"


class AccessLog:
    """A ``Site`` on a ``StringTransport`` whose access log is kept in memory."""

    def __init__(self, formatter: Any) -> None:
        self.site = Site(Ok(), logFormatter=formatter, reactor=Clock())
        self.site.startFactory()  # the log's timestamp; its timer is on the Clock
        self.out = io.StringIO()
        self.site.logFile = self.out

    def request(self, head: bytes) -> str:
        """Send one request head; return the access-log line it produced."""
        channel = self.site.buildProtocol(PEER)
        assert channel is not None
        transport = StringTransport(peerAddress=PEER)
        channel.makeConnection(transport)
        channel.dataReceived(head)
        assert transport.value().startswith(b"HTTP/1.1 ")
        channel.connectionLost(Exception("done"))  # type: ignore[arg-type]
        lines = self.out.getvalue().splitlines()
        self.out.seek(0)
        self.out.truncate()
        (line,) = lines
        return line

    def close(self) -> None:
        self.site.stopFactory()


@pytest.fixture
def access_log() -> Iterator[AccessLog]:
    log = AccessLog(access_log_formatter)
    yield log
    log.close()


def test_the_request_uri_is_logged_with_its_query_values_masked(access_log: AccessLog) -> None:
    line = access_log.request(
        f"GET /v1/responses?api_key={KEY}&model=gpt-5.5 HTTP/1.1\r\nHost: gw\r\n\r\n".encode()
    )
    assert KEY not in line
    assert '"GET /v1/responses?api_key=***&model=gpt-5.5 HTTP/1.1"' in line
    assert line.startswith('"192.0.2.7" - - ')


def test_the_referer_is_logged_without_its_userinfo_and_query_values(access_log: AccessLog) -> None:
    referer = f"https://me:hunter2@app.example/page?token={KEY}&x=1"
    line = access_log.request(
        f"GET /healthz HTTP/1.1\r\nHost: gw\r\nReferer: {referer}\r\n\r\n".encode()
    )
    assert KEY not in line and "hunter2" not in line
    assert '"https://app.example/page?token=***&x=***"' in line


def test_a_line_with_nothing_to_mask_is_twisteds_combined_log_line(access_log: AccessLog) -> None:
    head = b'GET /healthz HTTP/1.1\r\nHost: gw\r\nReferer: https://app.example/\r\nUser-Agent: say "hi"\r\n\r\n'
    ours = access_log.request(head)
    combined = AccessLog(combinedLogFormatter)
    try:
        theirs = combined.request(head)
    finally:
        combined.close()
    assert ours == theirs
    assert ours.endswith(' 200 2 "https://app.example/" "say \\"hi\\""')


def test_twisteds_default_formatter_would_log_the_key() -> None:
    """Why the formatter exists: Twisted's own line carries the raw URI."""
    combined = AccessLog(combinedLogFormatter)
    try:
        line = combined.request(f"GET /healthz?api_key={KEY} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    finally:
        combined.close()
    assert KEY in line


@pytest_twisted.ensureDeferred
async def test_the_gateways_access_log_shows_the_masked_path_and_not_the_key(fake: FakeUpstream) -> None:
    # With no logPath, a Site writes its access log to twisted.python.log.logfile, which turns
    # each line into a log event on the global publisher (where cch's observer renders it).
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        seen.append(formatEvent(event) + " " + repr(event.get("message", "")))

    running = await start_gateway(gateway_config(fake))
    pool = HTTPConnectionPool(reactor, persistent=False)
    globalLogPublisher.addObserver(observe)
    try:
        response = await treq.get(running.http_url + f"/healthz?api_key={KEY}", pool=pool, reactor=reactor)
        await treq.content(response)
    finally:
        globalLogPublisher.removeObserver(observe)
        await pool.closeCachedConnections()
        await running.stop()
    assert response.code == 200
    assert [text for text in seen if KEY in text] == []
    assert [text for text in seen if '"GET /healthz?api_key=*** HTTP/1.1" 200' in text], seen
