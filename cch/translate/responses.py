"""The Responses event sequence, built from a translator's calls.

Every translated API ends up here, so a Chat Completions stream and an Anthropic Messages stream
come out as the same shapes a real Responses upstream sends (``cch/testing/scripts.py``'s
``codex_events`` is the reference for a plain message): ``response.created`` and
``response.in_progress``, then output items one after the other, then one terminal event.

A translator calls, in any order its upstream dictates::

    b = ResponseBuilder(body, response_id="resp_x", model="gpt-5.5", created_at=1767225600)
    b.start()                                   # response.created, response.in_progress
    b.reasoning("thinking...", key=0)           # a reasoning item, one summary part
    b.reasoning_encrypted("sig", key=0)         # opaque encrypted_content, set on the item
    b.close(0)                                  # the item is complete
    b.text("Hello", key=1)                      # a message item with one output_text part
    b.function_call(("tool", 0), call_id="call_1", name="shell")
    b.function_arguments(("tool", 0), '{"cmd":')
    b.custom_tool_call(("tool", 1), call_id="call_2", name="apply_patch")
    b.custom_input(("tool", 1), "*** Begin Patch")
    b.finish(usage=Usage(10, 5))                # closes what is open; response.completed

Each call returns the events it makes (JSON objects, ``sequence_number`` from 0). ``key`` is the
translator's own address for an item: Chat's ``tool_calls[].index``, Anthropic's content block
index, anything hashable. A key names one open item; after ``close(key)`` the same key opens a
new item.

Items are streamed one at a time, in output order. Codex attributes ``response.output_text.delta``
and the reasoning deltas to "the active item" (the last ``response.output_item.added``; the deltas
it parses carry no item id), so two items must never be open on the wire at once. When the
translator feeds an item that is not first in line (a second tool call whose deltas interleave
with the first one's, text arriving while a tool call is still open), its content is kept and
sent, coalesced, when every item before it is done. A translator therefore closes an item as
soon as it knows it is complete, or the items after it wait for ``finish``.

On ``finish`` the open items are closed in output order (status ``incomplete`` when the response
is incomplete) and the terminal event carries the whole ``output`` and ``usage``. On ``fail`` the
open items are *not* closed: Codex acts on ``response.output_item.done`` (it runs a finished tool
call), and a half-streamed call must not run; the response's ``output`` lists only what was done.

Ids: the response id is the caller's; item ids are made from it and the output index
(``msg_<stem>_<n>``, ``rs_…``, ``fc_…``, ``ctc_…`` where ``resp_<stem>`` is the response id),
so they are unique per response and the same when the transcript is replayed.

Event JSON is byte-stable: every dict is built in the key order a real Responses upstream uses,
and each event is a fresh object (nothing emitted is mutated afterwards).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "REASONING",
    "TEXT",
    "ResponseBuilder",
    "Usage",
    "item_id",
]

Event = dict[str, Any]
IncompleteReason = Literal["max_output_tokens", "content_filter"]

#: The default keys of ``text`` and ``reasoning``, for translators with one of each at a time.
TEXT: Hashable = "text"
REASONING: Hashable = "reasoning"

_PREFIX = {
    "message": "msg",
    "reasoning": "rs",
    "function_call": "fc",
    "custom_tool_call": "ctc",
}


def item_id(kind: str, response_id: str, output_index: int) -> str:
    """The id of the ``output_index``-th item of a response: ``msg_<stem>_<n>`` etc., where the
    response id is ``resp_<stem>`` (or the whole id, without that prefix)."""
    stem = response_id.removeprefix("resp_")
    return f"{_PREFIX[kind]}_{stem}_{output_index}"


@dataclass(frozen=True)
class Usage:
    """Token counts in Responses terms. ``input_tokens`` includes ``cached_tokens`` (as Chat's
    ``prompt_tokens`` does; an Anthropic translator adds its cache reads and writes in);
    ``output_tokens`` includes ``reasoning_tokens``. ``total_tokens`` defaults to the sum."""

    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int | None = None

    def as_json(self) -> dict[str, Any]:
        total = self.total_tokens
        if total is None:
            total = self.input_tokens + self.output_tokens
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": total,
        }


@dataclass
class _Item:
    """One output item: what the translator gave (``parts``, ``closed_parts``, ``closed``) and
    what was sent of it (``added``, ``sent``, ``sent_closed``, ``done``)."""

    kind: str  # message | reasoning | function_call | custom_tool_call
    output_index: int
    id: str
    call_id: str = ""
    name: str = ""
    # message: the output_text parts (at most one); reasoning: the summary parts;
    # function_call: [arguments]; custom_tool_call: [input].
    parts: list[str] = field(default_factory=list)
    closed_parts: int = 0
    closed: bool = False
    encrypted_content: str | None = None
    status: str = "completed"
    added: bool = False
    sent: list[int] = field(default_factory=list)
    sent_closed: int = 0
    done: bool = False


class ResponseBuilder:
    """The Responses events of one turn, from a translator's calls (see the module docstring).

    ``body`` is the client's Responses request (what the ``response`` object echoes),
    ``response_id`` the gateway's id for the turn, ``model`` the model name the client asked
    for, ``created_at`` the Unix time of the turn."""

    def __init__(
        self, body: dict[str, Any], *, response_id: str, model: str, created_at: int
    ) -> None:
        self._body = body
        self._response_id = response_id
        self._model = model
        self._created_at = created_at
        self._sequence = 0
        self._items: list[_Item] = []
        self._open: dict[Hashable, _Item] = {}
        self._started = False
        self._terminal: str | None = None

    # --- state --------------------------------------------------------------------------------

    @property
    def response_id(self) -> str:
        return self._response_id

    @property
    def started(self) -> bool:
        """``start`` was called."""
        return self._started

    @property
    def finished(self) -> bool:
        """A terminal event (completed / incomplete / failed) was made; every later call
        returns ``[]``."""
        return self._terminal is not None

    @property
    def terminal(self) -> str | None:
        """The terminal event's type, once made."""
        return self._terminal

    def is_open(self, key: Hashable) -> bool:
        """An item is open under ``key`` (opened and not closed)."""
        return key in self._open

    def kind(self, key: Hashable) -> str | None:
        """The type of the item open under ``key`` (``"message"``, ``"reasoning"``,
        ``"function_call"``, ``"custom_tool_call"``), or None."""
        item = self._open.get(key)
        return item.kind if item is not None else None

    @property
    def output(self) -> list[dict[str, Any]]:
        """The items done so far, as the terminal event's ``output`` lists them."""
        return [self._item_json(item) for item in self._items if item.done]

    # --- the translator's calls ---------------------------------------------------------------

    def start(self) -> list[Event]:
        """``response.created`` and ``response.in_progress`` (once; later calls return [])."""
        if self._started or self.finished:
            return []
        self._started = True
        return [
            self._event("response.created", response=self._response("in_progress")),
            self._event("response.in_progress", response=self._response("in_progress")),
        ]

    def text(self, delta: str, *, key: Hashable = TEXT) -> list[Event]:
        """Assistant text: opens a ``message`` item under ``key`` on its first text."""
        if self.finished or not delta:
            return []
        events = self.start()
        item = self._get(key, "message")
        if not item.parts:
            item.parts.append("")
        item.parts[-1] += delta
        return events + self._advance()

    def reasoning(self, delta: str, *, key: Hashable = REASONING) -> list[Event]:
        """Reasoning text, shown as a summary: opens a ``reasoning`` item under ``key`` and, on
        the first delta after the item opened or after ``reasoning_part``, a summary part."""
        if self.finished or not delta:
            return []
        events = self.start()
        item = self._get(key, "reasoning")
        if len(item.parts) == item.closed_parts:
            item.parts.append("")
        item.parts[-1] += delta
        return events + self._advance()

    def reasoning_part(self, *, key: Hashable = REASONING) -> list[Event]:
        """End the current summary part of the reasoning item under ``key``; the next
        ``reasoning`` delta starts a new one (``summary_index`` + 1). No-op without a part."""
        item = self._open.get(key)
        if self.finished or item is None or item.kind != "reasoning":
            return []
        item.closed_parts = len(item.parts)
        return self._advance()

    def reasoning_encrypted(
        self, encrypted_content: str, *, key: Hashable = REASONING
    ) -> list[Event]:
        """Set the reasoning item's opaque ``encrypted_content`` (sent on the done item; e.g. an
        Anthropic thinking block's signature). Opens the item if none is open under ``key``."""
        if self.finished:
            return []
        events = self.start()
        item = self._get(key, "reasoning")
        item.encrypted_content = encrypted_content
        return events + self._advance()

    def redacted_reasoning(self, encrypted_content: str, *, key: Hashable) -> list[Event]:
        """A whole ``reasoning`` item with no summary, kept only as ``encrypted_content`` (e.g.
        an Anthropic ``redacted_thinking`` block): opened and closed at once."""
        if self.finished:
            return []
        events = self.start()
        if key in self._open:
            raise ValueError(f"an item is already open under key {key!r}")
        item = self._get(key, "reasoning")
        item.encrypted_content = encrypted_content
        return events + self.close(key)

    def function_call(self, key: Hashable, *, call_id: str, name: str) -> list[Event]:
        """Open a ``function_call`` item under ``key``; ``function_arguments`` streams its
        arguments."""
        return self._open_call(key, "function_call", call_id, name)

    def function_arguments(self, key: Hashable, delta: str) -> list[Event]:
        """A fragment of the arguments (JSON text) of the function call open under ``key``."""
        return self._call_delta(key, "function_call", delta)

    def custom_tool_call(self, key: Hashable, *, call_id: str, name: str) -> list[Event]:
        """Open a ``custom_tool_call`` item (a freeform tool such as Codex's ``apply_patch``)
        under ``key``; ``custom_input`` streams its ``input``."""
        return self._open_call(key, "custom_tool_call", call_id, name)

    def custom_input(self, key: Hashable, delta: str) -> list[Event]:
        """A fragment of the ``input`` of the custom tool call open under ``key``."""
        return self._call_delta(key, "custom_tool_call", delta)

    def close(self, key: Hashable) -> list[Event]:
        """The item under ``key`` is complete (its done events go out when it is first in line).
        No-op if nothing is open under ``key``."""
        item = self._open.pop(key, None)
        if self.finished or item is None:
            return []
        item.closed_parts = len(item.parts)
        item.closed = True
        return self._advance()

    def finish(
        self, *, incomplete: IncompleteReason | None = None, usage: Usage | None = None
    ) -> list[Event]:
        """Close every open item in output order, then ``response.completed`` — or
        ``response.incomplete`` with ``incomplete_details.reason`` = ``incomplete`` (the items
        still open get status ``incomplete``). ``usage`` None (the upstream gave none) is sent
        as ``"usage": null``."""
        if self.finished:
            return []
        events = self.start()
        for key, item in list(self._open.items()):
            if incomplete is not None:
                item.status = "incomplete"
            events += self.close(key)
        if incomplete is None:
            self._terminal = "response.completed"
            response = self._response("completed", usage=usage)
        else:
            self._terminal = "response.incomplete"
            response = self._response(
                "incomplete", usage=usage, incomplete_details={"reason": incomplete}
            )
        events.append(self._event(self._terminal, response=response))
        return events

    def fail(self, code: str, message: str) -> list[Event]:
        """``response.failed`` with ``response.error`` = {code, message}. Open items are left
        open (see the module docstring); their buffered content is dropped."""
        if self.finished:
            return []
        events = self.start()
        self._terminal = "response.failed"
        self._open.clear()
        error = {"code": code, "message": message}
        events.append(self._event(self._terminal, response=self._response("failed", error=error)))
        return events

    # --- internals ----------------------------------------------------------------------------

    def _open_call(self, key: Hashable, kind: str, call_id: str, name: str) -> list[Event]:
        if self.finished:
            return []
        if key in self._open:
            raise ValueError(f"an item is already open under key {key!r}")
        events = self.start()
        item = self._get(key, kind)
        item.call_id = call_id
        item.name = name
        item.parts.append("")
        return events + self._advance()

    def _call_delta(self, key: Hashable, kind: str, delta: str) -> list[Event]:
        if self.finished:
            return []
        item = self._open.get(key)
        if item is None or item.kind != kind:
            raise ValueError(f"no {kind} is open under key {key!r}")
        if not delta:
            return []
        item.parts[0] += delta
        return self._advance()

    def _get(self, key: Hashable, kind: str) -> _Item:
        """The item open under ``key``, or a new one of ``kind``."""
        item = self._open.get(key)
        if item is not None:
            if item.kind != kind:
                raise ValueError(f"key {key!r} is a {item.kind}, not a {kind}")
            return item
        index = len(self._items)
        item = _Item(kind, index, item_id(kind, self._response_id, index))
        self._items.append(item)
        self._open[key] = item
        return item

    def _advance(self) -> list[Event]:
        """Send what is sendable: the first item not done is the live one; bring the wire up
        to date with it, and move on to the next once it is done."""
        events: list[Event] = []
        for item in self._items:
            if item.done:
                continue
            events += self._sync(item)
            if not item.done:
                break
        return events

    def _sync(self, item: _Item) -> list[Event]:
        events: list[Event] = []
        if not item.added:
            item.added = True
            events.append(
                self._event(
                    "response.output_item.added",
                    output_index=item.output_index,
                    item=self._item_json(item, added=True),
                )
            )
        for index, text in enumerate(item.parts):
            if index == len(item.sent):
                item.sent.append(0)
                events += self._part_added(item, index)
            if len(text) > item.sent[index]:
                events.append(self._delta(item, index, text[item.sent[index] :]))
                item.sent[index] = len(text)
            if index < item.closed_parts and index == item.sent_closed:
                item.sent_closed += 1
                events += self._part_done(item, index)
        if item.closed:
            item.done = True
            events.append(
                self._event(
                    "response.output_item.done",
                    output_index=item.output_index,
                    item=self._item_json(item),
                )
            )
        return events

    def _part_added(self, item: _Item, index: int) -> list[Event]:
        where = self._where(item, index)
        if item.kind == "message":
            part = {"type": "output_text", "text": "", "annotations": []}
            return [self._event("response.content_part.added", **where, part=part)]
        if item.kind == "reasoning":
            part = {"type": "summary_text", "text": ""}
            return [self._event("response.reasoning_summary_part.added", **where, part=part)]
        return []

    def _delta(self, item: _Item, index: int, delta: str) -> Event:
        where = self._where(item, index)
        if item.kind == "message":
            return self._event("response.output_text.delta", **where, delta=delta, logprobs=[])
        if item.kind == "reasoning":
            return self._event("response.reasoning_summary_text.delta", **where, delta=delta)
        if item.kind == "function_call":
            return self._event("response.function_call_arguments.delta", **where, delta=delta)
        return self._event("response.custom_tool_call_input.delta", **where, delta=delta)

    def _part_done(self, item: _Item, index: int) -> list[Event]:
        where = self._where(item, index)
        text = item.parts[index]
        if item.kind == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            return [
                self._event("response.output_text.done", **where, text=text, logprobs=[]),
                self._event("response.content_part.done", **where, part=part),
            ]
        if item.kind == "reasoning":
            part = {"type": "summary_text", "text": text}
            return [
                self._event("response.reasoning_summary_text.done", **where, text=text),
                self._event("response.reasoning_summary_part.done", **where, part=part),
            ]
        if item.kind == "function_call":
            return [self._event("response.function_call_arguments.done", **where, arguments=text)]
        return [self._event("response.custom_tool_call_input.done", **where, input=text)]

    @staticmethod
    def _where(item: _Item, index: int) -> dict[str, Any]:
        """The addressing fields of an event about part ``index`` of ``item``."""
        if item.kind == "message":
            return {"item_id": item.id, "output_index": item.output_index, "content_index": index}
        if item.kind == "reasoning":
            return {"item_id": item.id, "output_index": item.output_index, "summary_index": index}
        if item.kind == "function_call":
            return {"item_id": item.id, "output_index": item.output_index}
        return {"output_index": item.output_index, "item_id": item.id}

    @staticmethod
    def _item_json(item: _Item, *, added: bool = False) -> dict[str, Any]:
        """The item as ``response.output_item.added`` (``added``) or ``.done`` and the terminal
        event's ``output`` show it."""
        status = "in_progress" if added else item.status
        if item.kind == "message":
            content = (
                []
                if added
                else [{"type": "output_text", "text": t, "annotations": []} for t in item.parts]
            )
            return {
                "id": item.id,
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": content,
            }
        if item.kind == "reasoning":
            summary = [] if added else [{"type": "summary_text", "text": t} for t in item.parts]
            reasoning: dict[str, Any] = {"id": item.id, "type": "reasoning", "summary": summary}
            if not added and item.encrypted_content is not None:
                reasoning["encrypted_content"] = item.encrypted_content
            return reasoning
        value = "" if added else item.parts[0]
        if item.kind == "function_call":
            return {
                "id": item.id,
                "type": "function_call",
                "status": status,
                "arguments": value,
                "call_id": item.call_id,
                "name": item.name,
            }
        return {
            "id": item.id,
            "type": "custom_tool_call",
            "status": status,
            "call_id": item.call_id,
            "input": value,
            "name": item.name,
        }

    def _event(self, type: str, **fields: Any) -> Event:
        event = {"type": type, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _response(
        self,
        status: str,
        *,
        usage: Usage | None = None,
        error: dict[str, Any] | None = None,
        incomplete_details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The ``response`` object, echoing the request as the Responses API does."""
        body = self._body
        reasoning = body.get("reasoning")
        reasoning = reasoning if isinstance(reasoning, dict) else {}
        text = body.get("text")
        text = {
            "format": {"type": "text"},
            "verbosity": "medium",
            **(text if isinstance(text, dict) else {}),
        }
        return {
            "id": self._response_id,
            "object": "response",
            "created_at": self._created_at,
            "status": status,
            "background": bool(body.get("background", False)),
            "error": error,
            "incomplete_details": incomplete_details,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": body.get("max_tool_calls"),
            "model": self._model,
            "output": self.output if status != "in_progress" else [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": body.get("prompt_cache_key"),
            "reasoning": {
                "effort": reasoning.get("effort"),
                "summary": reasoning.get("summary"),
            },
            "safety_identifier": body.get("safety_identifier"),
            "service_tier": body.get("service_tier") or "default",
            "store": body.get("store") is not False,
            "temperature": body.get("temperature", 1.0),
            "text": text,
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_logprobs": body.get("top_logprobs", 0),
            "top_p": body.get("top_p", 1.0),
            "truncation": body.get("truncation", "disabled"),
            "usage": usage.as_json() if usage is not None else None,
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }
