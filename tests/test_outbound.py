"""What the gateway sends upstream: URL joining and header building
(docs/reference-behaviour.md#upstream-headers)."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from cch.config import BreakerConfig, ClientKey, ProviderConfig
from cch.handler.auth import KeyRing, presented_key
from cch.handler.outbound import for_responses_provider, upstream_headers, upstream_url
from cch.handler.routing import ProviderRouter


@pytest.mark.parametrize(
    ("base", "url"),
    [
        ("https://api.openai.com/v1", "https://api.openai.com/v1/responses"),
        ("https://api.openai.com/v1/", "https://api.openai.com/v1/responses"),
        ("https://x.test", "https://x.test/v1/responses"),
        ("https://x.test/openai/v1", "https://x.test/openai/v1/responses"),
        ("https://x.test/custom/responses", "https://x.test/custom/responses"),
        ("http://127.0.0.1:9/api", "http://127.0.0.1:9/api/v1/responses"),
    ],
)
def test_upstream_url_joins_without_doubling(base: str, url: str) -> None:
    assert upstream_url(base) == url


def _provider(**kw: object):
    config = ProviderConfig(name="p", base_url="https://x.test/v1", **kw)  # type: ignore[arg-type]
    return ProviderRouter([config], BreakerConfig(), Clock()).get("p")


def test_headers_drop_client_credentials_hops_privacy_and_markers() -> None:
    client = {
        "authorization": "Bearer client-key",
        "x-api-key": "client-key",
        "host": "gateway",
        "connection": "keep-alive",
        "content-length": "10",
        "x-forwarded-for": "1.2.3.4",
        "x-real-ip": "1.2.3.4",
        "cookie": "a=b",
        "traceparent": "00-abc",
        "x-cch-internal-secret": "s",
        "x-cch-tenant": "t",
        "sec-websocket-key": "k",
        "originator": "codex_exec",
        "openai-beta": "responses_websockets=2026-02-06",
        "session-id": "019a",
        "user-agent": "codex_exec/0.169.0",
    }
    headers = upstream_headers(client, _provider(api_key="sk-up", headers=(("X-Team", "a"),)), stream=True)
    assert headers == {
        "originator": "codex_exec",
        "openai-beta": "responses_websockets=2026-02-06",
        "session-id": "019a",
        "user-agent": "codex_exec/0.169.0",
        "content-type": "application/json",
        "accept": "text/event-stream",
        "accept-encoding": "identity",
        "x-team": "a",
        "authorization": "Bearer sk-up",
    }


def test_headers_named_by_the_client_connection_header_are_hop_by_hop_and_dropped() -> None:
    client = {
        "connection": "keep-alive, X-Secret-Hop,, originator ",
        "x-secret-hop": "s",
        "originator": "codex_exec",
        "session-id": "019a",
    }
    headers = upstream_headers(client, _provider(), stream=True)
    assert "x-secret-hop" not in headers and "originator" not in headers
    assert "connection" not in headers and headers["session-id"] == "019a"


def test_connection_listed_headers_are_dropped_even_when_forward_headers_names_them() -> None:
    client = {"connection": "openai-organization", "openai-organization": "org-1"}
    provider = _provider(forward_headers=("openai-organization",))
    assert "openai-organization" not in upstream_headers(client, provider, stream=True)


def test_via_and_forwarding_headers_do_not_reach_the_provider() -> None:
    client = {"via": "1.1 proxy.internal", "forwarded": "for=1.2.3.4", "x-forwarded-host": "gw"}
    headers = upstream_headers(client, _provider(), stream=True)
    assert not {"via", "forwarded", "x-forwarded-host"} & set(headers)


def test_client_cannot_choose_the_billed_organization_or_project() -> None:
    client = {"openai-organization": "org-client", "openai-project": "proj-client", "originator": "c"}
    headers = upstream_headers(client, _provider(api_key="sk-up"), stream=True)
    assert "openai-organization" not in headers and "openai-project" not in headers
    assert headers["originator"] == "c"


def test_forward_headers_let_the_named_default_dropped_headers_through() -> None:
    client = {
        "openai-organization": "org-client",
        "openai-project": "proj-client",
        "traceparent": "00-abc",
        "x-forwarded-for": "1.2.3.4",
    }
    provider = _provider(forward_headers=("openai-organization", "traceparent"))
    headers = upstream_headers(client, provider, stream=True)
    assert headers["openai-organization"] == "org-client" and headers["traceparent"] == "00-abc"
    assert "openai-project" not in headers and "x-forwarded-for" not in headers


def test_forward_headers_never_let_client_credentials_through() -> None:
    # Config refuses these names; the header builder holds the line on its own as well.
    client = {"authorization": "Bearer client-key", "x-api-key": "client-key", "cookie": "a=b"}
    provider = _provider(forward_headers=("authorization", "x-api-key", "cookie"))
    headers = upstream_headers(client, provider, stream=True)
    assert "authorization" not in headers and "x-api-key" not in headers and "cookie" not in headers


def test_headers_without_provider_key_send_no_authorization_and_a_default_agent() -> None:
    headers = upstream_headers({"authorization": "Bearer c"}, _provider(), stream=False)
    assert "authorization" not in headers
    assert headers["accept"] == "application/json"
    assert headers["user-agent"].startswith("codex_cli_rs/")


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"authorization": "Bearer sk-1"}, "sk-1"),
        ({"authorization": "bearer   sk-1 "}, "sk-1"),
        ({"x-api-key": "sk-2"}, "sk-2"),
        ({"authorization": "Basic abc", "x-api-key": "sk-3"}, "sk-3"),
        ({"authorization": "Bearer "}, None),
        ({}, None),
    ],
)
def test_presented_key(headers: dict[str, str], key: str | None) -> None:
    assert presented_key(headers) == key


def test_keyring() -> None:
    ring = KeyRing([ClientKey(name="alice", key="sk-cch-alice-1"), ClientKey(name="bob", key="sk-cch-bob-22")])
    assert ring.required
    assert ring.authenticate({"authorization": "Bearer sk-cch-bob-22"}) == (True, ring.match("sk-cch-bob-22"))
    assert ring.match("sk-cch-bob-22").name == "bob"
    assert ring.authenticate({"authorization": "Bearer sk-cch-bob-2"}) == (False, None)
    assert KeyRing([]).authenticate({}) == (True, None)


def test_a_responses_provider_gets_the_mapped_model_and_no_foreign_reasoning() -> None:
    plain = ProviderConfig(name="p", base_url="http://x/v1")
    mapped = ProviderConfig(name="p", base_url="http://x/v1", model_map=(("gpt-5.5", "gpt-5.5-2026"),))
    ours = {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA-openai"}
    theirs = {"type": "reasoning", "summary": [], "encrypted_content": "cch-anthropic:thinking:sig"}
    body = {"model": "gpt-5.5", "input": [ours, {"type": "message", "role": "user", "content": "hi"}]}
    assert for_responses_provider(body, plain) is body  # nothing to change: the same object
    assert for_responses_provider(body, mapped) == {**body, "model": "gpt-5.5-2026"}
    failed_over = {"model": "gpt-5.5", "input": [theirs, ours], "store": False}
    assert for_responses_provider(failed_over, plain) == {"model": "gpt-5.5", "input": [ours], "store": False}
    assert list(for_responses_provider(failed_over, mapped)) == ["model", "input", "store"]  # order kept
    assert for_responses_provider({"model": "m", "input": "text"}, mapped) == {"model": "m", "input": "text"}
