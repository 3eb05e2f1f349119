"""A custom (freeform) tool's input, streamed out of the JSON arguments a translated API carries.

Chat and Anthropic have function tools only, so a Responses ``custom`` tool (Codex's
``apply_patch``) travels as a function with one string parameter, and its call's arguments come
back as ``{"input": "..."}`` in JSON fragments. :class:`CustomInput` gives the decoded text as
the fragments arrive, so Codex sees ``response.custom_tool_call_input.delta`` events as it would
from a Responses upstream.
"""

from __future__ import annotations

import json
import re

__all__ = ["CustomInput"]


class CustomInput:
    """Streams the ``input`` string out of a custom call's arguments ``{"input": "..."}`` as
    its JSON text arrives, decoding escapes only once they are whole. Arguments of any other
    shape are kept and given whole by :meth:`finish`."""

    _PREFIX = ("{", '"input"', ":", '"')
    _PLAIN = re.compile(r'[^"\\]+')
    _ESCAPES = {
        '"': '"',
        "\\": "\\",
        "/": "/",
        "b": "\b",
        "f": "\f",
        "n": "\n",
        "r": "\r",
        "t": "\t",
    }

    def __init__(self) -> None:
        self._raw = ""
        self._state = "prefix"  # prefix | string | after | other
        self._pos = 0
        self._sent = ""

    def feed(self, fragment: str) -> str:
        self._raw += fragment
        if self._state == "prefix":
            start = self._prefix()
            if start is None:
                return ""
            if start < 0:
                self._state = "other"
                return ""
            self._state, self._pos = "string", start
        if self._state != "string":
            return ""
        text = self._decode()
        self._sent += text
        return text

    def finish(self) -> str:
        """The rest of the input once the arguments are complete ("" if all was sent)."""
        try:
            value = json.loads(self._raw)
        except ValueError:
            value = None
        if self._sent or self._state in ("string", "after"):
            whole = value.get("input") if isinstance(value, dict) else None
            if isinstance(whole, str) and whole.startswith(self._sent):
                return whole[len(self._sent) :]
            return ""  # cut short (a length stop): what was sent stands
        if isinstance(value, dict):
            if isinstance(value.get("input"), str):
                return value["input"]
            strings = [v for v in value.values() if isinstance(v, str)]
            if len(value) == 1 and strings:
                return strings[0]
        return self._raw

    def _prefix(self) -> int | None:
        """Where the string starts; None: not enough text yet; -1: not this shape."""
        raw, i = self._raw, 0
        for token in self._PREFIX:
            while i < len(raw) and raw[i] in " \t\r\n":
                i += 1
            have = raw[i : i + len(token)]
            if not token.startswith(have):
                return -1
            if len(have) < len(token):
                return None
            i += len(token)
        return i

    def _decode(self) -> str:
        raw, i = self._raw, self._pos
        out: list[str] = []
        while i < len(raw):
            plain = self._PLAIN.match(raw, i)
            if plain:
                out.append(plain.group())
                i = plain.end()
                continue
            if raw[i] == '"':
                self._state = "after"
                i += 1
                break
            # A backslash: decode the escape once it is all here.
            if i + 1 >= len(raw):
                break
            kind = raw[i + 1]
            if kind == "u":
                if i + 6 > len(raw):
                    break
                width = 6
                if 0xD800 <= _hex(raw[i + 2 : i + 6]) < 0xDC00:
                    width = 12  # a surrogate pair: wait for the low half too
                    if i + 12 > len(raw):
                        break
                try:
                    out.append(json.loads('"' + raw[i : i + width] + '"'))
                except ValueError:
                    self._state = "other"
                    break
                i += width
            elif kind in self._ESCAPES:
                out.append(self._ESCAPES[kind])
                i += 2
            else:
                self._state = "other"
                break
        self._pos = i
        return "".join(out)


def _hex(text: str) -> int:
    try:
        return int(text, 16)
    except ValueError:
        return -1
