"""Translation between the Responses API Codex speaks and the APIs of other providers.

``api`` is the seam (:class:`~cch.translate.api.Api`), ``responses`` builds the Responses event
sequence every translation emits, ``chat`` and ``anthropic`` are the two translated APIs.
Nothing here is imported until a translated provider needs it (:func:`api_named`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cch.translate.api import Api

__all__ = ["api_named"]

# providers[].api -> (module, class): imported on first use.
_APIS = {"chat": ("cch.translate.chat", "ChatApi"), "anthropic": ("cch.translate.anthropic", "AnthropicApi")}


def api_named(name: str) -> Api:
    """A new :class:`~cch.translate.api.Api` for ``providers[].api`` = ``name``."""
    try:
        module_name, class_name = _APIS[name]
    except KeyError:
        raise ValueError(f"no translated API named {name!r} (known: {', '.join(_APIS)})") from None
    api: Api = getattr(importlib.import_module(module_name), class_name)()
    return api
