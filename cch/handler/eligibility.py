"""Should this attempt try an upstream WebSocket?

docs/reference-behaviour.md#upstream-websocket-eligibility, with cch's provider setting.
"""

from __future__ import annotations

from dataclasses import dataclass

from cch.handler.routing import Provider
from cch.turn import RequestContext
from cch.upstream.unsupported import UnsupportedCache

NOT_WEBSOCKET_CLIENT = "not_websocket_client"
PROVIDER_WEBSOCKET_OFF = "provider_websocket_off"
SETTING_DISABLED = "setting_disabled"
UNSUPPORTED_CACHED = "endpoint_ws_unsupported_cached"


@dataclass(frozen=True, slots=True)
class Eligibility:
    eligible: bool
    websocket_client: bool
    downgrade_reason: str | None = None


# Verdicts are values: each is made once, not per attempt.
_NOT_WEBSOCKET = Eligibility(False, False)
_OFF = Eligibility(False, True, PROVIDER_WEBSOCKET_OFF)
_DISABLED = Eligibility(False, True, SETTING_DISABLED)
_CACHED = Eligibility(False, True, UNSUPPORTED_CACHED)
_ELIGIBLE = Eligibility(True, True)


def evaluate(
    ctx: RequestContext,
    provider: Provider,
    *,
    enabled: bool,
    unsupported: UnsupportedCache,
    endpoint: str | None = None,
) -> Eligibility:
    """In order: a trusted WebSocket turn? provider allows it? global toggle on? not cached as
    unsupported (``auto`` only)? Each "no" after the first carries the downgrade reason."""
    if not ctx.via_websocket:
        return _NOT_WEBSOCKET
    mode = provider.config.websocket
    if mode == "off":
        return _OFF
    if not enabled:
        return _DISABLED
    # "on" insists: the unsupported cache only steers "auto" providers.
    if mode == "auto" and unsupported.lookup(provider.name, endpoint) is not None:
        return _CACHED
    return _ELIGIBLE
