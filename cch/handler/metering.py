"""One turn's usage, seen on its way to the client: the ledger row and what the limits count.

A :class:`TurnMeter` is the sink the pipeline hands to whoever serves a turn; it passes every
call through and looks only at what it needs: the time of the first event, the response id
(``response.created`` and terminals), and the terminal event's ``response`` (status, model,
``usage``), which it also hands to the attempt's transcript writer — one pass over the events. Deltas cost one set lookup (their type is known already: whoever parsed the event
passed it on). :meth:`TurnMeter.row` makes the one :class:`~cch.usage.rows.UsageRow`, however
the turn ended (docs/usage.md), and ends the turn's span with it when tracing is on
(docs/tracing.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IPushProducer, IReactorTime

from cch.handler.continuity import TranscriptRecorder
from cch.jsoncodec import loads
from cch.turn import ResponseSink
from cch.usage.prices import PriceSheet
from cch.usage.rows import UsageRow, usage_counts
from cch.wire import TERMINAL_EVENT_TYPES, error_code, event_type, response_of
from cch.wsframes import FrameRelay

if TYPE_CHECKING:
    from cch.tracing import TurnSpan

# A terminal event's type → the row's status.
TERMINAL_STATUS = {
    "response.completed": "completed",
    "response.failed": "failed",
    "response.incomplete": "incomplete",
    "error": "error",
}
STREAM_WITHOUT_TERMINAL = "stream_ended_without_terminal"


class TurnMeter:
    """A pass-through :class:`~cch.turn.ResponseSink` that remembers what the row needs."""

    def __init__(
        self,
        sink: ResponseSink,
        clock: IReactorTime,
        *,
        request_id: str,
        key: str | None,
        model: str | None,
        client_transport: str,
        on_response_id: Callable[[str], None] | None = None,
    ) -> None:
        self.sink = sink
        self.clock = clock
        self.request_id = request_id
        self.key = key
        self.model_requested = model
        self.client_transport = client_transport
        self.on_response_id = on_response_id
        self.started_at = clock.seconds()
        self.first_event_at: float | None = None
        self._created: str | None = None  # the response.created event, unparsed
        self.response_id: str | None = None
        self.terminal: str | None = None  # the terminal event's type
        self.response: dict[str, Any] | None = None  # the terminal's (or JSON body's) response
        self.error_code: str | None = None
        self.status: str | None = None  # set when the turn ended without a terminal
        # What the pipeline tells: where the turn went.
        self.provider: str | None = None
        self.upstream_transport: str | None = None
        self.attempts = 0
        self.replayed = False
        # The attempt's transcript writer, when the connection keeps one (cch.handler.continuity).
        self.recorder: TranscriptRecorder | None = None
        # The turn's span, when tracing is on (cch.tracing): ended with the row.
        self.trace: TurnSpan | None = None
        # Steering: the input of the steer(s) that will end the response in flight (its
        # successor's input), and the tokens of the responses steering ended.
        self._steering: list[Any] | None = None
        self._steered_tokens: tuple[int | None, int | None, int | None, int | None] = (None, None, None, None)

    # -- ResponseSink ----------------------------------------------------------------------

    def sse_started(self, status: int, headers: dict[str, str]) -> None:
        self.sink.sse_started(status, headers)

    def sse_event(self, data: str, kind: str | None = None) -> None:
        if kind is None:
            kind = event_type(data)
        if self.first_event_at is None:
            self.first_event_at = self.clock.seconds()
            if kind == "response.created":
                self._created = data  # read only if no terminal says the id (a cut turn)
        if kind in TERMINAL_EVENT_TYPES and self.terminal is None:
            if self._steering is not None and kind == "response.incomplete":
                self._steered_away(data)
            else:
                self._terminal(data, kind)  # type: ignore[arg-type]
        self.sink.sse_event(data, kind)

    def steered(self, steer_input: list[Any]) -> None:
        """The upstream ends the response in flight because it was steered; its successor,
        which answers ``steer_input``, follows in this turn (cch/upstream/exchange.py)."""
        self._steering = steer_input

    def _steered_away(self, data: str) -> None:
        """A response steering ended: its tokens count, and it goes into the transcript; its
        successor is recorded as its continuation, with the steer's input."""
        steer_input, self._steering = self._steering or [], None
        response = response_of(data)
        if response is None:
            return
        self._steered_tokens = _added(self._steered_tokens, usage_counts(response))
        recorder = self.recorder
        if recorder is not None and isinstance(response.get("id"), str):
            recorder.record(response)
            self.recorder = recorder.successor(response["id"], steer_input)

    def frame_relay(self) -> FrameRelay | None:
        """The sink's relay: events of types the meter does not read may go round it
        (cch.upstream.exchange.READ_EVENT_TYPES; the first event is always read)."""
        offer = getattr(self.sink, "frame_relay", None)
        return offer() if offer is not None and self.first_event_at is not None else None

    def json_body(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        """A whole response at once: an error (status ≥ 400) or a non-streamed response object."""
        if self.first_event_at is None:
            self.first_event_at = self.clock.seconds()
        if self.status is None and self.terminal is None:
            if status >= 400:
                self.status, self.error_code = "error", error_code(body) or f"http_{status}"
            else:
                try:
                    parsed = loads(body)
                except ValueError:
                    parsed = None
                said = parsed.get("status") if isinstance(parsed, dict) else None
                self.status = said if said in ("failed", "incomplete") else "completed"
                if isinstance(parsed, dict):
                    self._response(parsed)
                    if self.recorder is not None and said != "failed":
                        self.recorder.record(parsed)
        if headers is None:
            self.sink.json_body(status, body, content_type)
        else:
            self.sink.json_body(status, body, content_type, headers)

    def register_producer(self, producer: IPushProducer) -> None:
        self.sink.register_producer(producer)

    def unregister_producer(self) -> None:
        self.sink.unregister_producer()

    # -- what the events say ---------------------------------------------------------------

    def _terminal(self, data: str, kind: str) -> None:
        self.terminal = kind
        if kind == "error":
            self.error_code = error_code(data)
            return
        response = response_of(data)
        if response is not None:
            self._response(response)
            if self.recorder is not None and kind != "response.failed":
                self.recorder.record(response)

    def _response(self, response: dict[str, Any]) -> None:
        """A response object (a terminal's, or a whole JSON body): its id, and the code of its
        ``error`` when it failed."""
        self.response = response
        self._response_id(response.get("id"))
        error = response.get("error")
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            self.error_code = error["code"]

    def _response_id(self, value: Any) -> None:
        if isinstance(value, str) and value and self.response_id is None:
            self.response_id = value
            if self.on_response_id is not None:
                self.on_response_id(value)

    # -- the end ---------------------------------------------------------------------------

    def ended(self, status: str, code: str | None = None) -> None:
        """The turn ended without a terminal event: ``cancelled``, ``drained``, ``refused`` or
        ``error`` (with ``code``). A terminal already seen stands."""
        if self.terminal is None and self.status is None:
            self.status = status
            self.error_code = code

    @property
    def tokens(self) -> tuple[int | None, int | None, int | None, int | None]:
        """(input, cached input, output, reasoning) as the upstream reported them (for a steered
        turn, summed over the responses steering ended and the last)."""
        return _added(self._steered_tokens, usage_counts(self.response))

    def row(self, prices: PriceSheet, replica: str) -> UsageRow:
        now = self.clock.seconds()
        if self.response_id is None and self._created is not None:
            # Cut before its terminal: the id response.created gave (a stored response exists).
            created = response_of(self._created)
            if created is not None:
                self._response_id(created.get("id"))
        status = self.status or TERMINAL_STATUS.get(self.terminal or "", None)
        if status is None:
            status, self.error_code = "error", self.error_code or STREAM_WITHOUT_TERMINAL
        served = self.response.get("model") if self.response is not None else None
        served = served if isinstance(served, str) else None
        input_tokens, cached, output, reasoning = self.tokens
        cost = prices.cost(served or self.model_requested, input_tokens, cached, output)
        row = UsageRow(
            request_id=self.request_id,
            started_at=self.started_at,
            ended_at=now,
            response_id=self.response_id,
            key=self.key,
            provider=self.provider,
            model_requested=self.model_requested,
            model_served=served,
            client_transport=self.client_transport,
            upstream_transport=self.upstream_transport,
            status=status,
            error_code=self.error_code,
            attempts=self.attempts,
            replayed=self.replayed,
            input_tokens=input_tokens,
            cached_input_tokens=cached,
            output_tokens=output,
            reasoning_tokens=reasoning,
            cost=cost,
            first_event_ms=None if self.first_event_at is None else (self.first_event_at - self.started_at) * 1000,
            duration_ms=(now - self.started_at) * 1000,
            replica=replica,
        )
        if self.trace is not None:
            self.trace.end(row)
        return row


def _added(
    a: tuple[int | None, int | None, int | None, int | None], b: tuple[int | None, int | None, int | None, int | None]
) -> tuple[int | None, int | None, int | None, int | None]:
    """Token counts summed; None only where neither says."""
    return tuple(x if y is None else y if x is None else x + y for x, y in zip(a, b, strict=True))  # type: ignore[return-value]
