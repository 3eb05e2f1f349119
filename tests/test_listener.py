"""The listener: any Twisted server endpoint, systemd socket activation, and a privileged port
bound in ``privilegedStartService`` (before ``twistd --uid`` drops root)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from conftest import gateway_config, response_create
from test_plugin import TWISTD, Child
from twisted.internet import endpoints, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.systemd import ListenFDs
from twisted.web.client import HTTPConnectionPool

from cch.config import ClientKey, ConfigError, ServerConfig, load_config
from cch.service import makeService
from cch.testing import FakeUpstream

KEY = "sk-cch-systemd-0123456789"
TIMEOUT = 20.0


@pytest_twisted.ensureDeferred
async def test_twistd_serves_on_a_socket_handed_over_by_systemd(tmp_path: Path, fake: FakeUpstream) -> None:
    # What systemd does for a .socket unit: bind and listen, then start the service with the
    # socket as fd 3, LISTEN_FDS=1 and LISTEN_PID=<the service's pid>.
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    port = listening.getsockname()[1]
    config = tmp_path / "cch.toml"
    config.write_text(
        '[server]\nlisten = "systemd:domain=INET:index=0"\n'
        f'[[keys]]\nname = "alice"\nkey = "{KEY}"\n'
        f'[[providers]]\nname = "fake"\nbase_url = "{fake.base_url}"\nwebsocket = "off"\n'
    )
    child = Child()
    # LISTEN_PID must be the process that adopts the socket: set it inside the child.
    snippet = "import os; os.environ['LISTEN_PID'] = str(os.getpid()); " + TWISTD
    argv = [sys.executable, "-c", snippet, "-n", "--pidfile=", "cch", "--config", str(config)]
    env = {"PATH": os.environ.get("PATH", os.defpath), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "cch.socket"}
    reactor.spawnProcess(
        child, sys.executable, argv, env=env, path=str(tmp_path), childFDs={0: "w", 1: "r", 2: "r", 3: listening.fileno()}
    )
    listening.close()  # the child holds the socket now
    try:
        await child.wait_for("server_listening")
        response = await treq.post(
            f"http://127.0.0.1:{port}/v1/responses",
            json=response_create(stream=False),
            headers={"authorization": f"Bearer {KEY}"},
            pool=HTTPConnectionPool(reactor, persistent=False),
        ).addTimeout(TIMEOUT, reactor)
        assert response.code == 200, child.output
        body = await treq.json_content(response)
        assert body["status"] == "completed"
    finally:
        if child.running:
            await child.terminate()


def test_a_keyless_systemd_listener_is_refused_with_what_to_do(tmp_path: Path, monkeypatch: Any) -> None:
    # As if systemd had handed over fd 3 (the endpoint is only built, never listened on).
    monkeypatch.setattr(endpoints._SystemdParser, "_sddaemon", ListenFDs([3]))
    config = tmp_path / "cch.toml"
    config.write_text('[server]\nlisten = "systemd:domain=INET:index=0"\n')
    with pytest.raises(ConfigError) as raised:
        load_config(config, {})
    message = str(raised.value)
    assert "server.listen: the address of a systemd: endpoint is known only once it listens" in message
    assert "add [[keys]]" in message


def test_a_systemd_listener_without_the_socket_says_so(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(endpoints._SystemdParser, "_sddaemon", ListenFDs([]))
    config = tmp_path / "cch.toml"
    config.write_text(f'[server]\nlisten = "systemd:domain=INET:index=0"\n[[keys]]\nname = "a"\nkey = "{KEY}"\n')
    with pytest.raises(ConfigError, match="no such socket was handed over by systemd"):
        load_config(config, {})


def test_a_privileged_port_is_bound_in_privileged_start_service(fake: Any) -> None:
    memory = MemoryReactorClock()
    config = gateway_config(
        fake,
        keys=(ClientKey(name="alice", key=KEY),),
        server=ServerConfig(listen="tcp:443:interface=127.0.0.1"),
    )
    service = makeService(config, memory, Clock())
    service.privilegedStartService()  # twistd calls this as root, before --uid/--gid apply
    assert [(port, interface) for port, _, _, interface in memory.tcpServers] == [(443, "127.0.0.1")]
    service.startService()  # after dropping privileges: no second bind
    assert len(memory.tcpServers) == 1
    assert service.listener.port is not None
