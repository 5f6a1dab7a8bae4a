"""Idle deadline and minimum rate for every request stream a client sends (and the model downloads it reads): a
stalled stream is cancelled.

One daemon thread per watchdog checks the streams in flight a few times a second; a stream pays two clock reads
and three attribute writes per message, no lock. Only the time a handler spends waiting for the peer's next
message counts: a handler that is busy (aggregating, or queued for the upload slot) does not make its peer late.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from fedcommon.chunk_wire import DataChunk

log = logging.getLogger(__name__)

# A peer that sends nothing for this long is gone or hostile (a 1 GiB model arrives in 4 MiB chunks).
STREAM_IDLE_S = 60.0
# Averaged over RATE_WINDOW_S of waiting: a link slower than this would take over a day for a 1 GiB model.
MIN_BYTES_PER_S = 8 << 10
RATE_WINDOW_S = 30.0


@dataclass(frozen=True)
class StreamDeadlines:
    """How long a request stream may stall (idle_s) and how slowly it may trickle (min_bytes_per_s over window_s)."""

    idle_s: float = STREAM_IDLE_S
    min_bytes_per_s: float = MIN_BYTES_PER_S
    window_s: float = RATE_WINDOW_S


class StreamStopped(Exception):
    """The request stream ended because it was cancelled, not because the peer finished it."""


class WatchedStream:
    """A request iterator whose waits are timed; `stopped` says why the server cancelled it (None: it did not)."""

    def __init__(
        self,
        chunks: Iterator[Any],
        context: grpc.ServicerContext,
        what: str,
        at_end: Callable[[WatchedStream], None] | None,
        recheck: Callable[[], str | None] | None,
    ):
        self._chunks = chunks
        self._context = context
        self.what = what
        self._at_end = at_end
        self.recheck = recheck
        self.waiting_since = 0.0  # monotonic start of the wait in progress; 0.0 when not waiting
        self.progress = (0.0, 0)  # (seconds waited for the peer, bytes received), written as one tuple
        self.window = (0.0, 0)  # progress when the current rate window opened (the watchdog's)
        self.stopped: str | None = None

    def __iter__(self) -> WatchedStream:
        return self

    def __next__(self) -> Any:
        began = self.waiting_since = time.monotonic()
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self.waiting_since = 0.0
            # grpcio may show a cancelled call as a stream that ended: a cut-off stream must not pass for a whole one.
            if self.stopped is not None:
                raise StreamStopped(self.stopped) from None
            if not self._context.is_active():
                raise StreamStopped("the peer cancelled the call") from None
            if self._at_end is not None:
                self._at_end(self)  # may refuse the stream's end (a certificate revoked meanwhile)
            raise
        except BaseException:
            self.waiting_since = 0.0
            raise
        waited, received = self.progress
        size = len(chunk.data) if isinstance(chunk, DataChunk) else chunk.ByteSize()
        self.progress = (waited + time.monotonic() - began, received + size)
        self.waiting_since = 0.0
        return chunk

    def stop(self, reason: str) -> None:
        """Cancel the call: the handler's wait for the next message raises at once.

        The peer sees CANCELLED without the reason (grpcio's sync server cannot send a status while the handler
        waits for a message); the server logs it, and an upload's audit entry names it.
        """
        self.stopped = reason
        self._context.cancel()


def stop_reason(chunks: Any) -> str | None:
    """Why the server cancelled the request stream `chunks`, if it did."""
    return chunks.stopped if isinstance(chunks, WatchedStream) else None


class StreamWatchdog:
    """Cancels request streams that stall past their idle deadline or trickle below the minimum rate."""

    def __init__(self, deadlines: StreamDeadlines = StreamDeadlines()):
        self.deadlines = deadlines
        self._streams: set[WatchedStream] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick = max(0.05, min(1.0, deadlines.idle_s / 4, deadlines.window_s / 4))

    def watch(
        self,
        chunks: Iterator[Any],
        context: grpc.ServicerContext,
        what: str,
        at_end: Callable[[WatchedStream], None] | None = None,
        recheck: Callable[[], str | None] | None = None,
    ) -> WatchedStream:
        """`chunks` under watch until `release` is called with it.

        at_end: runs when the peer closes the stream, before the handler sees the end; it may refuse the end by
        setting the stream's `stopped` and raising.
        recheck: asked on every check; a reason it returns cancels the stream (a certificate revoked meanwhile).
        """
        stream = WatchedStream(chunks, context, what, at_end, recheck)
        self._add(stream)
        return stream

    def watch_sends(self, chunks: Iterator[Any], context: grpc.ServicerContext, what: str) -> Iterator[Any]:
        """`chunks` passed on as a response stream, under the same deadlines: the time gRPC takes to send each one
        (waiting for the peer to read) counts, so a receiver that stalls cannot hold its stream (and its download
        slot) for longer than the idle deadline."""
        stream = WatchedStream(iter(()), context, what, None, None)
        self._add(stream)
        try:
            for chunk in chunks:
                began = stream.waiting_since = time.monotonic()
                yield chunk
                waited, sent = stream.progress
                size = len(chunk.data) if isinstance(chunk, DataChunk) else chunk.ByteSize()
                stream.progress = (waited + time.monotonic() - began, sent + size)
                stream.waiting_since = 0.0
        finally:
            self.release(stream)

    def _add(self, stream: WatchedStream) -> None:
        with self._lock:
            self._streams.add(stream)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stream-watchdog", daemon=True)
                self._thread.start()

    def release(self, stream: WatchedStream) -> None:
        """The handler is done with `stream`."""
        with self._lock:
            self._streams.discard(stream)

    def close(self) -> None:
        """Stop the watchdog's thread (the server is stopping)."""
        self._closed.set()

    def _run(self) -> None:
        while not self._closed.wait(self._tick):
            with self._lock:
                streams = list(self._streams)
            now = time.monotonic()
            for stream in streams:
                try:
                    reason = self._verdict(stream, now)
                except Exception:
                    log.exception("checking %s failed", stream.what)
                    continue
                if reason is not None and stream.stopped is None:
                    log.warning("%s cancelled: %s", stream.what, reason)
                    self.release(stream)
                    stream.stop(reason)

    def _verdict(self, stream: WatchedStream, now: float) -> str | None:
        """Why `stream` must stop now, or None."""
        d = self.deadlines
        if stream.recheck is not None:
            refused = stream.recheck()
            if refused is not None:
                return refused
        # Read progress before waiting_since: a wait that ends in between is then counted once at most.
        waited, received = stream.progress
        since = stream.waiting_since
        blocked = now - since if since else 0.0
        if blocked > d.idle_s:
            return f"the peer sent nothing for {d.idle_s:g}s (idle deadline)"
        waited += blocked
        window_waited, window_received = stream.window
        span = waited - window_waited
        if span >= d.window_s:
            got = received - window_received
            if got < d.min_bytes_per_s * span:
                return (
                    f"the peer sent {got} bytes in {span:.0f}s of waiting; the minimum rate is "
                    f"{d.min_bytes_per_s:g} bytes/s"
                )
            stream.window = (waited, received)
        return None
