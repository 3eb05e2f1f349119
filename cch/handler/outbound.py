"""What goes to an upstream: the URL and the headers.

See docs/reference-behaviour.md#upstream-headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from cch.config import ProviderConfig
from cch.handler.routing import Provider
from cch.headers import forwardable, without_hop_by_hop

log = Logger()

# What the reference sends when the client sent no User-Agent (Codex backends expect one).
DEFAULT_USER_AGENT = "codex_cli_rs/0.93.0 (Windows 10.0.26200; x86_64) vscode/1.108.1"


def upstream_url(base_url: str) -> str:
    """``base_url`` joined with ``/v1/responses`` without doubling path parts."""
    base = base_url.rstrip("/")
    if base.endswith("/responses"):
        return base
    if base.endswith("/v1"):
        return base + "/responses"
    return base + "/v1/responses"


def upstream_headers(
    client_headers: Mapping[str, str], provider: Provider, *, stream: bool
) -> dict[str, str]:
    """Client headers minus hop-by-hop ones (the Connection header's list included) and the
    blocked ones (cch.headers; the provider's ``forward_headers`` may let some of those
    through), then the provider's headers and credentials."""
    allowed = provider.config.forward_headers
    headers = {
        name: value
        for name, value in without_hop_by_hop(client_headers).items()
        if forwardable(name, allowed)
    }
    headers["content-type"] = "application/json"
    headers["accept"] = "text/event-stream" if stream else "application/json"
    headers["accept-encoding"] = "identity"
    for name, value in provider.config.headers:
        headers[name.lower()] = value
    if provider.config.api_key:
        headers["authorization"] = f"Bearer {provider.config.api_key}"
    headers.setdefault("user-agent", DEFAULT_USER_AGENT)
    return headers


# A reasoning item an Anthropic provider made (cch.translate.anthropic): only Anthropic can read it.
FOREIGN_REASONING = "cch-anthropic:"


def for_responses_provider(body: dict[str, Any], provider: ProviderConfig) -> dict[str, Any]:
    """``body`` as a Responses provider takes it: the model renamed by ``model_map``, and
    without reasoning items another API made (a conversation that failed over from Anthropic:
    OpenAI would refuse their encrypted content). ``body`` itself when nothing changes."""
    model = body.get("model")
    served = provider.upstream_model(model) if isinstance(model, str) else model
    items = body.get("input")
    kept = items
    if isinstance(items, list):
        kept = [item for item in items if not _foreign_reasoning(item)]
        if len(kept) == len(items):
            kept = items
    if served == model and kept is items:
        return body
    adapted = dict(body)
    if served != model:
        adapted["model"] = served
    if kept is not items:
        adapted["input"] = kept
    return adapted


def _foreign_reasoning(item: Any) -> bool:
    if not isinstance(item, dict) or item.get("type") != "reasoning":
        return False
    content = item.get("encrypted_content")
    return isinstance(content, str) and content.startswith(FOREIGN_REASONING)


async def post_attempt(
    upstream: Any, provider: Provider, url: str, headers: dict[str, str], body: bytes, *, attempt: int, request_id: str, trace: Any
) -> IResponse | None:
    """POST one attempt at ``provider`` (its timeouts and CA); None when it could not be
    reached — a breaker failure, logged and traced. A cancel abandons the attempt (no verdict)."""
    config = provider.config
    try:
        response: IResponse = await upstream.post(
            url,
            headers,
            body,
            connect_timeout=config.connect_timeout,
            first_byte_timeout=config.first_byte_timeout,
            tls_ca=config.tls_ca,
        )
    except CancelledError:
        provider.breaker.attempt_abandoned()
        raise
    except Exception as exc:
        provider.breaker.record_failure()
        log.warn(
            "upstream_attempt_failed",
            provider=provider.name,
            attempt=attempt,
            error=str(exc) or type(exc).__name__,
            request_id=request_id,
        )
        if trace is not None:
            trace.failed("unreachable")
        return None
    return response
