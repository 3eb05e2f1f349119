"""Which certificates an upstream's TLS must chain to: the system's, or a provider's own CA."""

from __future__ import annotations

import functools
import re
from typing import Any

from twisted.internet.ssl import Certificate, trustRootFromCertificates

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


@functools.lru_cache(maxsize=64)
def trust_root(path: str | None) -> Any:
    """None (platform trust) or the certificates of the PEM bundle at ``path``."""
    if path is None:
        return None
    with open(path, "rb") as handle:
        blocks = _PEM.findall(handle.read())
    return trustRootFromCertificates([Certificate.loadPEM(block) for block in blocks])
