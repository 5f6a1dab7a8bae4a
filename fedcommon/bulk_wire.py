"""The bulk channel's framing: a kind byte and a length, then a bounded protobuf message or raw tensor bytes.

A model's tensors cross the bulk channel as the same parts a gRPC model stream carries (TensorHeader, data), so
the reader yields the chunk objects the gRPC path yields and every check downstream is the same code.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable, Iterator

from google.protobuf.message import DecodeError, Message

from fedcommon.chunk_wire import DataChunk
from fedcommon.wire import training_pb2 as pb

_HEAD = struct.Struct("<BI")  # kind, payload length
OPEN, ACK, MODEL_HEADER, TENSOR, DATA, END, REPLY = range(1, 8)
_MESSAGES: dict[int, type[Message]] = {
    OPEN: pb.BulkOpen,
    ACK: pb.Ack,
    MODEL_HEADER: pb.ModelHeader,
    TENSOR: pb.TensorHeader,
    REPLY: pb.SubmitReply,
}
_NAMES = {
    OPEN: "open",
    ACK: "ack",
    MODEL_HEADER: "model header",
    TENSOR: "tensor header",
    DATA: "data",
    END: "end",
    REPLY: "reply",
}
MAX_MESSAGE_BYTES = 64 << 10
MAX_DATA_BYTES = 16 << 20
# Data frames a sender makes: small enough that many transfers at once hold little memory, large enough that
# the per-frame cost (two TLS writes, a Python loop turn) vanishes next to the bytes.
CHUNK_BYTES = 1 << 20


class BulkError(Exception):
    """A frame that breaks the framing rules, or a connection that broke off or stalled; the message says which."""


def _name(kind: int) -> str:
    return _NAMES.get(kind, f"unknown (kind {kind})")


def _reader(sock: socket.socket) -> Callable[[int, memoryview], int]:
    """read(n, into) for `sock`: a TLS socket's own record reader where it has one, else recv_into.

    A TLS read returns at most one 16 KiB record, so a GiB is 65,536 reads; ssl.SSLSocket.recv_into wraps each in two
    Python calls and checks. Measured on this project's 2-core VM, receiving a GiB over loopback TLS took 1.52-1.55
    CPU-seconds through recv_into and 1.28-1.30 through the record reader that recv_into ends in (the same C call
    on the same OpenSSL object; only the Python around it goes). Where a Python names it otherwise, recv_into."""
    record_reader = getattr(getattr(sock, "_sslobj", None), "read", None)
    if isinstance(sock, ssl.SSLSocket) and callable(record_reader):
        return record_reader
    return lambda n, into: sock.recv_into(into, n)


class FrameReader:
    """Reads frames from a socket. A data frame's payload comes in pieces of at most `piece_bytes`, each a view of
    one reused buffer, valid until the next read: the reader holds that much, whatever the size of the sender's frames.

    The socket's timeout is the idle deadline of each read; with `min_bytes_per_s`, a peer whose bytes arrive more
    slowly than that, over `window_s` seconds spent waiting for it, is cut off.
    """

    def __init__(
        self,
        sock: socket.socket,
        max_data: int = MAX_DATA_BYTES,
        min_bytes_per_s: float = 0.0,
        window_s: float = 30.0,
        piece_bytes: int = CHUNK_BYTES,
    ):
        self._sock = sock
        self._read = _reader(sock)
        self._max_data = max_data
        self._piece = max(1, piece_bytes)
        self._head = memoryview(bytearray(_HEAD.size))
        self._buf = bytearray()
        self._data_left = 0  # bytes of the current data frame not yet read
        self._min_rate = min_bytes_per_s
        self._window_s = window_s
        self._waited = 0.0  # seconds spent in recv in the current rate window
        self._window_bytes = 0

    def _fill(self, view: memoryview) -> None:
        got, want = 0, len(view)
        while got < want:
            began = time.monotonic()
            try:
                n = self._read(want - got, view[got:])
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):  # as recv_into says it: nothing more will come
                n = 0
            except TimeoutError:
                raise BulkError(f"no data from the peer for {self._sock.gettimeout():.0f}s") from None
            except OSError as e:
                raise BulkError(f"the connection broke off ({e})") from None
            if not n:
                raise BulkError("the peer closed the connection mid-frame" if got else "the peer closed the connection")
            got += n
            if self._min_rate:
                self._check_rate(time.monotonic() - began, n)

    def _check_rate(self, waited: float, n: int) -> None:
        self._waited += waited
        self._window_bytes += n
        if self._waited >= self._window_s:
            rate = self._window_bytes / self._waited
            if rate < self._min_rate:
                raise BulkError(f"the peer sends {rate:.0f} bytes/s; the minimum is {self._min_rate:.0f}")
            self._waited, self._window_bytes = 0.0, 0

    def frame(self) -> tuple[int, memoryview]:
        """The next frame's kind and payload, or the next piece of a data frame's payload (as a data frame of its
        own); BulkError for an unknown kind or a payload over its bound."""
        if self._data_left:
            return DATA, self._piece_of_data()
        self._fill(self._head)
        kind, length = _HEAD.unpack(self._head)
        if kind == DATA:
            limit = self._max_data
        elif kind == END:
            limit = 0
        elif kind in _MESSAGES:
            limit = MAX_MESSAGE_BYTES
        else:
            raise BulkError(f"malformed frame: unknown kind {kind}")
        if length > limit:
            raise BulkError(f"a {_name(kind)} frame of {length} bytes; the limit is {limit}")
        if kind == DATA:
            self._data_left = length
            return DATA, self._piece_of_data()
        return kind, self._payload(length)

    def _piece_of_data(self) -> memoryview:
        n = min(self._data_left, self._piece)
        self._data_left -= n
        return self._payload(n)

    def _payload(self, length: int) -> memoryview:
        if len(self._buf) < length:
            self._buf = bytearray(length)
        payload = memoryview(self._buf)[:length]
        self._fill(payload)
        return payload

    def release(self) -> None:
        """Free the data buffer (the next data frame makes a new one): nothing held while the peer waits for a reply."""
        self._buf = bytearray()

    def message(self, kind: int) -> Message:
        """The next frame, which must be a protobuf message of `kind`."""
        got, payload = self.frame()
        if got != kind:
            raise BulkError(f"expected a {_name(kind)} frame, got a {_name(got)} frame")
        return parse(kind, payload)

    def chunks(self) -> Iterator[pb.ModelChunk | DataChunk]:
        """Tensor and data frames as the gRPC stream's chunks, until the end frame (each data chunk is a view of
        the reused buffer: consume it before taking the next)."""
        while True:
            kind, payload = self.frame()
            if kind == DATA:
                yield DataChunk(payload)
            elif kind == TENSOR:
                yield pb.ModelChunk(tensor=parse(TENSOR, payload))
            elif kind == END:
                return
            else:
                raise BulkError(f"a {_name(kind)} frame inside a tensor stream")


def parse(kind: int, payload: memoryview) -> Message:
    """A message frame's protobuf; BulkError names the frame that does not parse."""
    try:
        return _MESSAGES[kind].FromString(bytes(payload))
    except DecodeError as e:
        raise BulkError(f"malformed {_name(kind)} frame: {e}") from None


class FrameWriter:
    """Writes frames to a socket; a data frame's bytes go out from the caller's buffer, uncopied."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def _send(self, *parts: bytes | memoryview) -> None:
        try:
            for part in parts:
                self._sock.sendall(part)
        except TimeoutError:
            raise BulkError(f"the peer took no data for {self._sock.gettimeout():.0f}s") from None
        except OSError as e:
            raise BulkError(f"the connection broke off ({e})") from None

    def message(self, kind: int, message: Message) -> None:
        payload = message.SerializeToString()
        if len(payload) > MAX_MESSAGE_BYTES:
            raise BulkError(f"a {_name(kind)} of {len(payload)} bytes; the limit is {MAX_MESSAGE_BYTES}")
        self._send(_HEAD.pack(kind, len(payload)) + payload)

    def data(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, view.nbytes, MAX_DATA_BYTES):
            part = view[start : start + MAX_DATA_BYTES]
            self._send(_HEAD.pack(DATA, part.nbytes), part)

    def end(self) -> None:
        self._send(_HEAD.pack(END, 0))

    def chunks(self, chunks: Iterable[pb.ModelChunk | DataChunk]) -> int:
        """Send a tensor stream's chunks (no end frame); returns the data bytes sent."""
        sent = 0
        for chunk in chunks:
            part = chunk.WhichOneof("part")
            if part == "data":
                self.data(chunk.data)
                sent += memoryview(chunk.data).nbytes
            elif part == "tensor":
                self.message(TENSOR, chunk.tensor)
            else:
                raise BulkError(f"a {part!r} chunk inside a tensor stream")
        return sent
