"""twistd dropins: `twistd -n cch ...` (the gateway) and `twistd -n cch-fake-upstream ...`."""

from twisted.application.service import ServiceMaker

cch = ServiceMaker(
    "cch",
    "cch.plugin",
    "Responses-API-over-WebSocket gateway for coding agents",
    "cch",
)

cch_fake_upstream = ServiceMaker(
    "cch-fake-upstream",
    "cch.testing.plugin",
    "Scriptable fake OpenAI Responses upstream (HTTP SSE + WebSocket) for tests and demos",
    "cch-fake-upstream",
)
