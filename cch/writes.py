"""Write coalescing: the frames one upstream read produces leave in one write per socket.

An upstream read usually carries many events (often a whole turn), and each becomes a client
frame. Handing every frame to the transport on its own costs more than building it, so while
a read is handled (``with write_batch:``), writers collect their frames and register here, and
each writes its collection once when the outermost read is done. Nothing waits on a timer:
everything is written before control returns to the reactor, so latency and ordering are what
they would be with one write per frame.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

log = Logger()


class WriteBatch:
    """The batch window of the running reactor thread (nesting allowed)."""

    def __init__(self) -> None:
        self.depth = 0
        self._dirty: list[BatchedWriter] = []

    @property
    def open(self) -> bool:
        return self.depth > 0

    def add(self, writer: BatchedWriter) -> None:
        """``writer`` has collected its first frame of this batch."""
        self._dirty.append(writer)

    def __enter__(self) -> WriteBatch:
        self.depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self.depth -= 1
        if self.depth == 0:
            while self._dirty:
                dirty, self._dirty = self._dirty, []
                for writer in dirty:
                    try:
                        writer.flush_writes()
                    except Exception:
                        log.failure("write_batch_flush_failed")


write_batch = WriteBatch()


class BatchedWriter:
    """Writes at once, or, while a batch is open, collects and writes once when it ends.

    Subclasses say how bytes are written (:meth:`write_now`); anything they write another way
    must call :meth:`flush_writes` first, to keep the order.
    """

    _pending: list[bytes] | None = None  # what was collected during the open batch

    def write_batched(self, *parts: bytes) -> None:
        if write_batch.depth:
            pending = self._pending
            if pending is None:
                self._pending = list(parts)
                write_batch.add(self)
            else:
                pending.extend(parts)
        else:
            self.write_now(b"".join(parts))

    def flush_writes(self) -> None:
        pending, self._pending = self._pending, None
        if pending:
            self.write_now(b"".join(pending))

    def write_now(self, data: bytes) -> None:
        raise NotImplementedError
