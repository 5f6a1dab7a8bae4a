"""The .fl model file: exact round trip, atomic replacement, streaming, refusal of damaged files."""

import ml_dtypes
import numpy as np
import pytest

from fedcommon.dtypes import DTypeError
from fedcommon.model_file import (
    ModelFileError,
    iter_model_chunks,
    load_model,
    read_index,
    save_model,
)
from fedcommon.tensor_codec import decode_tensors


def _model():
    rng = np.random.default_rng(1)
    return {
        "fc.weight": rng.standard_normal((5, 3)).astype(np.float32),
        "fc.bias": rng.standard_normal(5).astype(np.float64),
        "bn.count": np.array(7, dtype=np.int64),
        "half": rng.standard_normal(9).astype(ml_dtypes.bfloat16),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_save_and_load_roundtrip_exactly(tmp_path):
    model = _model()
    save_model(tmp_path / "m.fl", model, {"round": 3})
    loaded, meta = load_model(tmp_path / "m.fl")
    assert meta == {"round": 3}
    assert list(loaded) == list(model)
    for k, v in model.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
        assert loaded[k].tobytes() == v.tobytes()


def test_tensors_are_64_byte_aligned(tmp_path):
    save_model(tmp_path / "m.fl", _model())
    with open(tmp_path / "m.fl", "rb") as f:
        assert all(e.offset % 64 == 0 for e in read_index(f).entries)


def test_streaming_from_file_equals_the_model(tmp_path):
    model = _model()
    save_model(tmp_path / "m.fl", model)
    with open(tmp_path / "m.fl", "rb") as f:
        out = decode_tensors(iter_model_chunks(f, read_index(f), chunk_bytes=16))
    assert {k: v.tobytes() for k, v in out.items()} == {k: v.tobytes() for k, v in model.items()}


def test_failed_save_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "m.fl"
    save_model(path, {"a": np.ones(3, np.float32)})
    with pytest.raises(DTypeError, match="complex64"):
        save_model(path, {"a": np.ones(3, np.float32), "bad": np.zeros(2, np.complex64)})
    loaded, _ = load_model(path)
    assert list(loaded) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.fl"], "temp file left behind"


def test_damaged_files_are_refused_with_the_path(tmp_path):
    bad = tmp_path / "bad.fl"
    bad.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelFileError, match="bad.fl.*magic"):
        load_model(bad)
    good = tmp_path / "good.fl"
    save_model(good, {"a": np.ones(1000, np.float32)})
    cut = tmp_path / "cut.fl"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(cut)
