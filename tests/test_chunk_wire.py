"""The hand-framed data chunks are protobuf's encoding byte for byte, and peers on either codec interoperate."""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError

from fedcommon.chunk_wire import DataChunk, TrainingStub, add_training_servicer, chunk_from_bytes, chunk_to_bytes
from fedcommon.tensor_codec import decode_tensors, encode_tensors
from fedcommon.wire import training_pb2 as pb
from fedcommon.wire import training_pb2_grpc as pb_grpc


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 2 * 1024 * 1024 + 3])
def test_a_data_chunk_is_encoded_exactly_as_protobuf_encodes_it(size):
    data = bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8))
    assert chunk_to_bytes(DataChunk(memoryview(data))) == pb.ModelChunk(data=data).SerializeToString()
    parsed = chunk_from_bytes(pb.ModelChunk(data=data).SerializeToString())
    assert isinstance(parsed, DataChunk) and bytes(parsed.data) == data
    assert parsed.WhichOneof("part") == "data"


def test_header_and_tensor_chunks_are_parsed_by_protobuf():
    for chunk in (
        pb.ModelChunk(header=pb.ModelHeader(status=pb.TRAIN, round=3, kind="model", num_tensors=2)),
        pb.ModelChunk(tensor=pb.TensorHeader(name="w", dtype="float32", shape=[2, 3], nbytes=24)),
    ):
        parsed = chunk_from_bytes(chunk.SerializeToString())
        assert isinstance(parsed, pb.ModelChunk) and parsed == chunk
        assert chunk_to_bytes(parsed) == chunk.SerializeToString()


def test_a_data_field_followed_by_more_fields_gets_protobufs_reading():
    # Protobuf keeps the last value of a oneof: the hand parser must not take the first data field alone.
    raw = pb.ModelChunk(data=b"first").SerializeToString() + pb.ModelChunk(data=b"second").SerializeToString()
    parsed = chunk_from_bytes(raw)
    assert isinstance(parsed, pb.ModelChunk) and parsed.data == b"second"


@pytest.mark.parametrize("raw", [b"\x1a\x05abc", b"\x1a\xff\xff", b"\x1a"])
def test_a_cut_off_data_chunk_is_refused_as_protobuf_refuses_it(raw):
    with pytest.raises(DecodeError):
        chunk_from_bytes(raw)


class _Echo(pb_grpc.FederatedTrainingServicer):
    """Sends a fixed model; accepts an upload when it decodes to that same model."""

    def __init__(self, model: dict[str, np.ndarray]):
        self.model = model

    def GetModel(self, request, context):
        yield pb.ModelChunk(header=pb.ModelHeader(status=pb.TRAIN, num_tensors=len(self.model)))
        yield from encode_tensors(self.model, chunk_bytes=1000)

    def SubmitUpdate(self, request_iterator, context):
        head = next(request_iterator).header
        got = decode_tensors(request_iterator)
        same = got.keys() == self.model.keys() and all(np.array_equal(got[k], self.model[k]) for k in got)
        return pb.SubmitReply(accepted=same, round=head.round)


@pytest.fixture
def echo_server():
    model = {"w": np.arange(3000, dtype=np.float32).reshape(30, 100), "b": np.float64(2.5) * np.ones(7)}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    add_training_servicer(_Echo(model), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", model
    server.stop(None)


@pytest.mark.parametrize("stub_kind", [TrainingStub, pb_grpc.FederatedTrainingStub])
def test_model_streams_work_between_this_codec_and_the_generated_one(echo_server, stub_kind):
    target, model = echo_server
    with grpc.insecure_channel(target) as channel:
        stub = stub_kind(channel)
        stream = stub.GetModel(pb.GetModelRequest(), timeout=10)
        assert next(stream).header.num_tensors == 2
        received = decode_tensors(stream)
        assert all(np.array_equal(received[k], model[k]) for k in model)
        chunks = [pb.ModelChunk(header=pb.ModelHeader(round=4, kind="delta_w")), *encode_tensors(received)]
        if stub_kind is pb_grpc.FederatedTrainingStub:  # the generated serializer takes protobuf messages only
            chunks = [c if isinstance(c, pb.ModelChunk) else pb.ModelChunk(data=bytes(c.data)) for c in chunks]
        reply = stub.SubmitUpdate(iter(chunks), timeout=10)
    assert reply.accepted and reply.round == 4
