"""cch: Responses-API-over-WebSocket gateway on Twisted + Autobahn."""
