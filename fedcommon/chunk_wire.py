"""ModelChunk messages on the wire without copies: data chunks framed by hand, every other part by protobuf.

A `data` chunk is, in protobuf's encoding, the tag byte of field 3 (length-delimited), a varint length and the
raw bytes: nothing to parse. Protobuf's own parser copies those bytes twice more (into the message, then out of
it on `.data`), which on a 2-core machine holds a model download to about 400 MiB/s. Here a received data
chunk is a view of the bytes gRPC handed over, and a sent one is joined once from a view of the tensor. The
encoding is protobuf's, byte for byte: peers using the generated classes read and write the same messages.
"""

from __future__ import annotations

from typing import Any

import grpc

from fedcommon.wire import training_pb2 as pb
from fedcommon.wire import training_pb2_grpc as pb_grpc

SERVICE = "fedlearn.v1.FederatedTraining"
_DATA_TAG = b"\x1a"  # field 3 (ModelChunk.data), wire type 2
_CHUNK_METHODS = {"GetModel", "SubmitUpdate", "SubmitBestModel", "GetValidationModels"}


class DataChunk:
    """A ModelChunk whose part is `data`; `data` is a buffer (a view of the received bytes, or of a tensor)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data

    def WhichOneof(self, oneof: str) -> str:  # noqa: N802 - the protobuf message's method name
        return "data"

    def HasField(self, field: str) -> bool:  # noqa: N802
        return field == "data"

    def SerializeToString(self) -> bytes:  # noqa: N802
        return chunk_to_bytes(self)


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    """The varint at raw[pos:] and the position after it; (-1, pos) when it is cut off or over 10 bytes."""
    value = shift = 0
    for i in range(pos, min(pos + 10, len(raw))):
        byte = raw[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    return -1, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def chunk_from_bytes(raw: bytes) -> pb.ModelChunk | DataChunk:
    """A received ModelChunk: a DataChunk viewing `raw` when it is exactly one data field, else protobuf's parse."""
    if raw[:1] == _DATA_TAG:
        length, start = _varint(raw, 1)
        if length >= 0 and start + length == len(raw):
            return DataChunk(memoryview(raw)[start:])
    return pb.ModelChunk.FromString(raw)


def chunk_to_bytes(chunk: pb.ModelChunk | DataChunk) -> bytes:
    """A ModelChunk's encoding: a DataChunk's bytes are copied once, behind their tag and length."""
    if isinstance(chunk, DataChunk):
        data = memoryview(chunk.data)
        return b"".join((_DATA_TAG, _encode_varint(data.nbytes), data))
    return chunk.SerializeToString()


class TrainingStub(pb_grpc.FederatedTrainingStub):
    """The generated stub, with the model streams' chunks through chunk_from_bytes / chunk_to_bytes."""

    def __init__(self, channel: Any) -> None:  # a grpc.Channel or a grpc.aio.Channel
        super().__init__(channel)
        self.GetModel = channel.unary_stream(
            f"/{SERVICE}/GetModel",
            request_serializer=pb.GetModelRequest.SerializeToString,
            response_deserializer=chunk_from_bytes,
        )
        self.GetValidationModels = channel.unary_stream(
            f"/{SERVICE}/GetValidationModels",
            request_serializer=pb.ValidationModelsRequest.SerializeToString,
            response_deserializer=chunk_from_bytes,
        )
        self.SubmitUpdate = channel.stream_unary(
            f"/{SERVICE}/SubmitUpdate",
            request_serializer=chunk_to_bytes,
            response_deserializer=pb.SubmitReply.FromString,
        )
        self.SubmitBestModel = channel.stream_unary(
            f"/{SERVICE}/SubmitBestModel",
            request_serializer=chunk_to_bytes,
            response_deserializer=pb.SubmitReply.FromString,
        )


class _Handlers:
    """Takes the method handlers the generated add_..._to_server function builds."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = dict(handlers)


def add_training_servicer(servicer: pb_grpc.FederatedTrainingServicer, server: grpc.Server) -> None:
    """pb_grpc.add_FederatedTrainingServicer_to_server, with the model streams' chunks through this module."""
    taken = _Handlers()
    pb_grpc.add_FederatedTrainingServicer_to_server(servicer, taken)
    handlers = dict(taken.handlers)
    for name in _CHUNK_METHODS:
        h = handlers[name]
        if h.unary_stream:
            handlers[name] = grpc.unary_stream_rpc_method_handler(
                h.unary_stream, request_deserializer=h.request_deserializer, response_serializer=chunk_to_bytes
            )
        else:
            handlers[name] = grpc.stream_unary_rpc_method_handler(
                h.stream_unary, request_deserializer=chunk_from_bytes, response_serializer=h.response_serializer
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
