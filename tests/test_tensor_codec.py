"""Tensor wire codec: exact round trips, chunking, and refusal of malformed streams."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcommon.dtypes import DTypeError, dtype_from_name
from fedcommon.tensor_codec import CodecError, TensorAssembler, decode_tensors, encode_tensor, encode_tensors
from fedcommon.wire import training_pb2 as pb

DTYPES = ["float16", "float32", "float64", "bfloat16", "int8", "int32", "int64", "uint8", "bool"]


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 7), min_size=0, max_size=3),
    chunk=st.integers(1, 64),
)
def test_roundtrip_is_bit_exact_for_every_dtype_and_chunk_size(dtype, shape, chunk):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype_from_name(dtype).itemsize, dtype=np.uint8)
    arr = raw.view(dtype_from_name(dtype)).reshape(shape)
    out = decode_tensors(encode_tensors({"w": arr}, chunk_bytes=chunk))
    assert out["w"].dtype == arr.dtype and out["w"].shape == arr.shape
    assert out["w"].tobytes() == arr.tobytes()


def test_bfloat16_is_carried_exactly_not_upcast():
    arr = np.array([1.00390625, -3.5, 1e-3], dtype=ml_dtypes.bfloat16)
    chunks = list(encode_tensor("b", arr))
    assert chunks[0].tensor.dtype == "bfloat16" and chunks[0].tensor.nbytes == 6
    out = decode_tensors(chunks)["b"]
    assert out.dtype == np.dtype(ml_dtypes.bfloat16)
    assert out.view(np.uint16).tolist() == arr.view(np.uint16).tolist()


def test_big_endian_and_non_contiguous_input_is_sent_little_endian_c_order():
    arr = np.arange(12, dtype=">f4").reshape(3, 4).T
    out = decode_tensors(encode_tensors({"x": arr}))["x"]
    np.testing.assert_array_equal(out, arr)
    assert out.dtype == np.dtype("<f4")


def test_data_chunks_respect_chunk_size():
    chunks = list(encode_tensor("x", np.zeros(1000, np.float32), chunk_bytes=1024))
    sizes = [len(c.data) for c in chunks[1:]]
    assert sizes == [1024, 1024, 1024, 928]


def test_unknown_dtype_is_refused():
    with pytest.raises(DTypeError, match="complex64"):
        list(encode_tensor("c", np.zeros(2, np.complex64)))
    header = pb.TensorHeader(name="x", dtype="object", shape=[1], nbytes=8)
    with pytest.raises(DTypeError, match="object"):
        TensorAssembler().start(header)


def test_header_size_that_disagrees_with_shape_is_refused():
    header = pb.TensorHeader(name="x", dtype="float32", shape=[4], nbytes=8)
    with pytest.raises(CodecError, match="needs 16"):
        TensorAssembler().start(header)


def test_data_beyond_announced_size_is_refused():
    asm = TensorAssembler()
    asm.start(pb.TensorHeader(name="x", dtype="uint8", shape=[2], nbytes=2))
    with pytest.raises(CodecError, match="more data"):
        asm.feed(b"abc")


def test_truncated_stream_is_refused():
    chunks = list(encode_tensor("x", np.zeros(100, np.float32), chunk_bytes=64))
    with pytest.raises(CodecError, match="ended early"):
        decode_tensors(chunks[:-1])


def test_data_before_header_and_duplicate_names_are_refused():
    with pytest.raises(CodecError, match="outside a tensor"):
        decode_tensors([pb.ModelChunk(data=b"x")])
    twice = list(encode_tensor("x", np.zeros(1, np.float32))) * 2
    with pytest.raises(CodecError, match="twice"):
        decode_tensors(twice)


# ---- decoding into the receiver's own arrays (a sink) ---------------------------------------------------------


def test_a_sink_array_that_fits_receives_the_tensor_in_place():
    sent = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "s": np.array(7, np.int64)}
    dest = {"w": np.zeros((3, 4), np.float32), "s": np.zeros((), np.int64)}
    asked = []

    def sink(spec):
        asked.append((spec.name, spec.dtype, spec.shape))
        return dest[spec.name]

    got = decode_tensors(encode_tensors(sent, chunk_bytes=8), sink=sink)
    assert asked == [("w", np.dtype(np.float32), (3, 4)), ("s", np.dtype(np.int64), ())]
    for name in sent:
        assert got[name] is dest[name]  # no buffer of its own, no copy
        np.testing.assert_array_equal(dest[name], sent[name])


@pytest.mark.parametrize(
    "offered",
    [
        np.zeros((3, 4), np.float64),  # another dtype
        np.zeros((4, 3), np.float32),  # another shape
        np.zeros((4, 3), np.float32).T,  # not C-contiguous
        np.frombuffer(bytes(48), np.float32).reshape(3, 4),  # read-only
        np.zeros((3, 4), np.dtype(">f4")),  # big-endian: not the wire's bytes
        [[0.0] * 4] * 3,  # not an array
        None,  # nothing offered
    ],
    ids=["dtype", "shape", "strided", "read-only", "big-endian", "list", "none"],
)
def test_a_sink_array_that_does_not_fit_is_left_alone_and_a_fresh_buffer_is_used(offered):
    sent = np.arange(12, dtype=np.float32).reshape(3, 4)
    before = np.array(offered, copy=True) if offered is not None else None
    got = decode_tensors(encode_tensors({"w": sent}), sink=lambda spec: offered)["w"]
    np.testing.assert_array_equal(got, sent)
    assert got.dtype == np.float32 and got.flags.writeable
    if isinstance(offered, np.ndarray):
        assert not np.shares_memory(got, offered)
        np.testing.assert_array_equal(offered, before)


def test_a_stream_that_breaks_off_leaves_the_sink_arrays_written_so_far():
    dest = {"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)}
    chunks = list(encode_tensors({"a": np.ones(4, np.float32), "b": np.full(4, 2.0, np.float32)}, chunk_bytes=8))
    with pytest.raises(CodecError, match="stream ended early: tensor 'b' has 8 of 16 bytes"):
        decode_tensors(chunks[:-1], sink=lambda spec: dest[spec.name])
    np.testing.assert_array_equal(dest["a"], np.ones(4, np.float32))
    np.testing.assert_array_equal(dest["b"], [2.0, 2.0, 0.0, 0.0])  # what the caller must know about


def test_on_tensor_hears_of_each_tensor_once_it_is_whole_and_checked():
    model = {"a": np.arange(6, dtype=np.float32), "b": np.zeros(0, np.int8), "c": np.ones((2, 2), np.float64)}
    chunks = list(encode_tensors(model, chunk_bytes=8))
    heard: list[str] = []

    def hear(name: str, arr: np.ndarray) -> None:
        np.testing.assert_array_equal(arr, model[name])
        heard.append(name)

    decode_tensors(chunks, on_tensor=hear)
    assert heard == ["a", "b", "c"]
    heard.clear()
    with pytest.raises(CodecError, match="stream ended early"):
        decode_tensors(chunks[:-1], on_tensor=lambda name, arr: heard.append(name))
    assert heard == ["a", "b"]  # c never came whole
    heard.clear()
    with pytest.raises(CodecError, match="'a' appears twice"):
        decode_tensors([*chunks, *encode_tensors({"a": model["a"]})], on_tensor=lambda name, arr: heard.append(name))
    assert heard == ["a", "b", "c"]  # not the repeat
