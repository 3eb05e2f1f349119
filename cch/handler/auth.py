"""Client API keys: who may use the gateway."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from cch.config import ClientKey


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a client presented: ``Authorization: Bearer <key>`` or ``x-api-key``."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def token_matches(headers: Mapping[str, str], token: str | None) -> bool:
    """Do the request's lower-cased ``headers`` present ``token`` (the admin token)?"""
    if token is None:
        return False
    presented = presented_key(headers)
    return presented is not None and hmac.compare_digest(presented.encode(), token.encode())


class KeyRing:
    """The configured client keys; empty means the gateway is open (loopback-only)."""

    def __init__(self, keys: Iterable[ClientKey]) -> None:
        self._keys = tuple(keys)

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def match(self, presented: str | None) -> ClientKey | None:
        """The key entry for ``presented``; every entry is compared in constant time."""
        if presented is None:
            return None
        given = presented.encode("utf-8")
        found = None
        for entry in self._keys:
            if hmac.compare_digest(given, entry.key.encode("utf-8")):
                found = entry
        return found

    def authenticate(self, headers: Mapping[str, str]) -> tuple[bool, ClientKey | None]:
        """(allowed, key entry). Allowed with no entry when no keys are configured."""
        if not self._keys:
            return True, None
        entry = self.match(presented_key(headers))
        return entry is not None, entry
