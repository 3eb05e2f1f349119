"""OpenAI-shaped JSON errors: ``{"error":{"message","type","code"}}``."""

from __future__ import annotations

from cch.wire import error_body

# The one body of a failure inside the gateway (a handler that broke before any event).
INTERNAL_ERROR = error_body("Internal error.", "server_error", "internal_error")


def unauthorized() -> tuple[int, bytes]:
    return 401, error_body(
        "Invalid or missing API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key'.",
        "authentication_error",
        "invalid_api_key",
    )


def no_provider(model: str | None) -> tuple[int, bytes]:
    what = f"model '{model}'" if model else "this request"
    return 503, error_body(
        f"No upstream provider is available for {what}.",
        "service_unavailable_error",
        "no_provider",
    )


def bad_gateway(message: str) -> tuple[int, bytes]:
    return 502, error_body(message, "bad_gateway_error", "upstream_unavailable")


def invalid_request(message: str, code: str = "invalid_request") -> tuple[int, bytes]:
    return 400, error_body(message, "invalid_request_error", code)
