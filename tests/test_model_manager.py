"""ClientModelManager with a small torch fitter: global model in, exact updates out, best model kept and saved."""

from __future__ import annotations

import errno
import math
import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fedclient.components.model_reader_writer import ModelProcessor
from fedclient.components.model_validator import ModelValidator
from fedclient.model_manager import READ_AHEAD_VARIABLES, ClientModelManager
from fedclient.site_algorithms import SCAFFOLD_CONTROL_PREFIX
from fedcommon.model_file import load_model
from fedcommon.model_meta import FLContext
from fedcommon.tensor_codec import CodecError, TensorSpec, decode_tensors, encode_tensors
from fedcommon.torch_state import state_dict_to_numpy

TASK = "task"
_ACCURACY = {"accuracy": 0.5}


class TinyFitter:
    """A fitter with a two-layer model; train() moves every parameter by 0.25 and counts 3 batches."""

    def __init__(self, metrics=_ACCURACY, iterations: int = 7, samples: int = 40):
        self.model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
        with torch.no_grad():  # eighths: every difference the tests take is exact
            for i, p in enumerate(self.model.parameters()):
                p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) / 8 + i)
        self.metrics = metrics
        self.iterations = iterations
        self.samples = samples

    def train(self, progress):
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(0.25)
        self.model[1].num_batches_tracked += 3
        if progress is not None:
            progress(1, 0.1)
        return {"steps": self.iterations}

    def validate(self):
        return self.metrics

    def num_local_iterations(self) -> int:
        return self.iterations

    def num_samples(self) -> int:
        return self.samples


def _global_model(fitter: TinyFitter, offset: float = 1.0) -> dict[str, np.ndarray]:
    """A global model of the fitter's layout whose float variables differ from the fitter's by `offset`."""
    arrays = state_dict_to_numpy(fitter.model.state_dict())
    out = {}
    for k, v in arrays.items():
        out[k] = np.asarray(v + np.asarray(offset, v.dtype) if v.dtype.kind == "f" else v + 5, v.dtype)
    return out


def _manager(fitter=None, **kwargs) -> ClientModelManager:
    mm = ClientModelManager(task_names=[TASK], **kwargs)
    if fitter is not None:
        mm.set_fitter(fitter)
    return mm


def _module_arrays(fitter: TinyFitter) -> dict[str, np.ndarray]:
    return state_dict_to_numpy(fitter.model.state_dict())


def test_assign_current_model_loads_the_global_weights_and_reports_the_change():
    fitter = TinyFitter()
    mm = _manager(fitter)
    glob = _global_model(fitter)
    assert mm.assign_current_model({TASK: glob}, {TASK: {"run_number": 2, "round": 4}}) is True
    for name, arr in _module_arrays(fitter).items():
        np.testing.assert_array_equal(arr, glob[name], err_msg=name)
    assert mm.model_vars(TASK) == list(glob)
    assert mm.model_meta(TASK) == {"run_number": 2, "round": 4}


def test_assigning_the_same_global_model_again_reports_no_change():
    fitter = TinyFitter()
    mm = _manager(fitter)
    glob = _global_model(fitter)
    mm.assign_current_model({TASK: glob})
    assert mm.assign_current_model({TASK: glob}) is False


def test_assign_current_model_without_a_fitter_raises():
    with pytest.raises(RuntimeError, match="set_fitter"):
        _manager().assign_current_model({TASK: {"w": np.zeros(2, np.float32)}})


def _trained_round() -> tuple[TinyFitter, ClientModelManager, dict[str, np.ndarray]]:
    """A manager that received a global model (the fitter's weights + 0.5) and then trained once."""
    fitter = TinyFitter()
    mm = _manager(fitter)
    glob = _global_model(fitter, offset=0.5)
    mm.assign_current_model({TASK: glob})
    fitter.train(None)
    return fitter, mm, glob


def test_delta_w_is_local_minus_global_exactly():
    fitter, mm, glob = _trained_round()
    local = _module_arrays(fitter)
    delta = mm.read_current_model(TASK, "delta_w")
    assert list(delta) == list(glob)
    params = {name for name, _ in fitter.model.named_parameters()}
    for name, d in delta.items():
        assert d.dtype == glob[name].dtype and d.shape == glob[name].shape, name
        np.testing.assert_array_equal(d, local[name] - glob[name], err_msg=name)
        np.testing.assert_array_equal(glob[name] + d, local[name], err_msg=name)
        if name in params:
            assert (d == np.float32(0.25)).all(), name
    np.testing.assert_array_equal(delta["1.running_mean"], np.zeros(2, np.float32))
    assert delta["1.num_batches_tracked"].dtype == np.int64 and int(delta["1.num_batches_tracked"]) == 3


def test_delta_w_is_the_default_type():
    fitter = TinyFitter()
    mm = _manager(fitter)
    mm.assign_current_model({TASK: _global_model(fitter)})
    fitter.train(None)
    np.testing.assert_array_equal(mm.read_current_model(TASK)["0.bias"], np.full(2, 0.25, np.float32))


def test_delta_w_of_float16_is_rounded_once_from_the_exact_difference():
    fitter = TinyFitter()
    fitter.model.half()
    mm = _manager(fitter)
    glob = _global_model(fitter, offset=0.125)
    mm.assign_current_model({TASK: glob})
    fitter.train(None)
    local = _module_arrays(fitter)
    d = mm.read_current_model(TASK, "delta_w")["0.weight"]
    assert d.dtype == np.float16
    expected = (local["0.weight"].astype(np.float32) - glob["0.weight"].astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(d, expected)


@pytest.mark.parametrize("exclude_vars", [["1.running_mean", "1.running_var"], r"^1\.running_"], ids=["list", "regex"])
def test_excluded_variables_are_neither_loaded_nor_sent(exclude_vars):
    fitter = TinyFitter()
    mm = _manager(fitter, exclude_vars=exclude_vars)
    before = _module_arrays(fitter)
    glob = _global_model(fitter)
    mm.assign_current_model({TASK: glob})
    after = _module_arrays(fitter)
    for name in ("1.running_mean", "1.running_var"):
        np.testing.assert_array_equal(after[name], before[name], err_msg=f"{name} was loaded")
    np.testing.assert_array_equal(after["0.weight"], glob["0.weight"])
    fitter.train(None)
    for type_str in ("delta_w", "model"):
        sent = mm.read_current_model(TASK, type_str)
        assert "1.running_mean" not in sent and "1.running_var" not in sent, type_str
        assert {"0.weight", "0.bias", "1.weight", "1.bias", "1.num_batches_tracked"} <= set(sent), type_str


def test_type_model_returns_the_local_weights():
    fitter = TinyFitter()
    mm = _manager(fitter)
    mm.assign_current_model({TASK: _global_model(fitter)})
    fitter.train(None)
    local = _module_arrays(fitter)
    sent = mm.read_current_model(TASK, "model")
    assert list(sent) == list(local)
    for name, arr in sent.items():
        np.testing.assert_array_equal(arr, local[name], err_msg=name)


def test_unknown_type_str_raises_naming_it():
    fitter = TinyFitter()
    mm = _manager(fitter)
    mm.assign_current_model({TASK: _global_model(fitter)})
    with pytest.raises(ValueError, match="'weights'"):
        mm.read_current_model(TASK, "weights")


def test_delta_w_before_any_global_model_raises():
    with pytest.raises(RuntimeError, match="no global model"):
        _manager(TinyFitter()).read_current_model(TASK, "delta_w")


def test_privacy_filter_result_is_what_is_sent():
    class HalveAndRecord:
        def __init__(self):
            self.calls = []

        def apply(self, delta, ctx):
            self.calls.append((dict(delta), ctx))
            return {"0.bias": delta["0.bias"] * np.float32(0.5)}

    fitter = TinyFitter()
    privacy = HalveAndRecord()
    mm = _manager(fitter, privacy=privacy)
    mm.assign_current_model({TASK: _global_model(fitter)})
    fitter.train(None)
    ctx = FLContext({"round": 3})
    sent = mm.read_current_model(TASK, "delta_w", train_ctx=ctx)
    assert list(sent) == ["0.bias"]
    np.testing.assert_array_equal(sent["0.bias"], np.full(2, 0.125, np.float32))
    ((seen_delta, seen_ctx),) = privacy.calls
    assert seen_ctx is ctx
    np.testing.assert_array_equal(seen_delta["0.bias"], np.full(2, 0.25, np.float32))


def test_the_filter_sees_the_local_steps_and_what_it_spent_travels_in_the_context():
    class Spend:
        last_epsilon = None

        def apply(self, delta, ctx):
            self.steps = ctx.get("local_steps")
            self.last_epsilon = 0.5
            return delta

    fitter = TinyFitter(iterations=7)
    privacy = Spend()
    mm = _manager(fitter, privacy=privacy)
    mm.assign_current_model({TASK: _global_model(fitter)})
    ctx = FLContext()
    mm.read_current_model(TASK, "delta_w", train_ctx=ctx)
    assert privacy.steps == 7
    assert ctx.get_prop("privacy_protocol") == "Spend" and ctx.get_prop("privacy_epsilon") == 0.5


class _Record:
    """A privacy filter that records the train_ctx it was given and sends the update as it is."""

    def __init__(self):
        self.contexts = []

    def apply(self, delta, ctx):
        self.contexts.append(ctx)
        return dict(delta)


class _TrainingContext:
    """A training-context object of the site's own: attributes only, neither a Mapping nor an FLContext."""

    local_steps = 5


@pytest.mark.parametrize("wrapped", [False, True], ids=["given-directly", "in-the-fl-context"])
def test_a_training_context_object_reaches_the_privacy_filter_as_its_train_ctx(wrapped):
    fitter = TinyFitter()
    privacy = _Record()
    mm = _manager(fitter, privacy=privacy)
    mm.assign_current_model({TASK: _global_model(fitter)})
    train_ctx = _TrainingContext()
    ctx = FLContext({"train_context": train_ctx}) if wrapped else train_ctx
    mm.read_current_model(TASK, "delta_w", train_ctx=ctx)
    assert privacy.contexts == [train_ctx]
    if wrapped:
        assert ctx.get_prop("privacy_protocol") == "_Record"


def test_a_visualizer_is_refused_saying_why():
    with pytest.raises(ValueError, match="visualizer is not supported: the seed documents no visualizer"):
        ClientModelManager(task_names=[TASK], visualizer=object())


def test_validate_model_validates_with_the_cross_site_val_configer_given():
    class Scored:
        def validate(self, fitter):
            return {"dice": float(fitter.model[0].bias.detach().sum())}

    fitter = TinyFitter()
    mm = _manager(fitter)
    checkpoint = _global_model(fitter, offset=2.0)
    before = _module_arrays(fitter)
    metrics = mm.validate_model(Scored(), checkpoint)
    assert metrics == {"dice": float(checkpoint["0.bias"].sum())}
    for name, arr in _module_arrays(fitter).items():
        np.testing.assert_array_equal(arr, before[name], err_msg=name)
    assert mm.validate_model(None, checkpoint) == _ACCURACY


def test_validate_model_refuses_a_cross_site_val_configer_that_cannot_validate():
    with pytest.raises(TypeError, match=r"cross_site_val_configer must have validate\(fitter\)"):
        _manager(TinyFitter()).validate_model({"config": "config_validation.json"}, None)


def test_privacy_filter_does_not_touch_type_model():
    class Refuse:
        def apply(self, delta, ctx):
            raise AssertionError("privacy applied to full weights")

    fitter = TinyFitter()
    mm = _manager(fitter, privacy=Refuse())
    assert "0.weight" in mm.read_current_model(TASK, "model")


def test_num_local_iterations_is_one_without_a_fitter_and_the_fitters_count_with_one():
    assert _manager().num_local_iterations() == 1
    assert _manager(TinyFitter(iterations=7)).num_local_iterations() == 7


def test_train_forwards_progress_to_the_fitter():
    fitter = TinyFitter()
    seen = []
    assert _manager(fitter).train(lambda epoch, loss: seen.append((epoch, loss))) == {"steps": 7}
    assert seen == [(1, 0.1)]


def test_update_current_model_loads_weights_except_excluded():
    fitter = TinyFitter()
    mm = _manager(fitter, exclude_vars=["0.bias"])
    bias = _module_arrays(fitter)["0.bias"]
    mm.update_current_model({"0.weight": np.ones((2, 3), np.float32), "0.bias": np.ones(2, np.float32)})
    local = _module_arrays(fitter)
    np.testing.assert_array_equal(local["0.weight"], np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(local["0.bias"], bias)


def _set_weight(fitter: TinyFitter, value: float) -> None:
    with torch.no_grad():
        fitter.model[0].weight.fill_(value)


def test_best_model_by_accuracy_keeps_the_highest_and_writes_it(tmp_path):
    fitter = TinyFitter()
    mm = _manager(fitter)
    path = tmp_path / "best_local_model.fl"
    _set_weight(fitter, 1.0)
    assert mm.update_best_model({"accuracy": 0.6, "loss": 0.9}, path) is True
    _set_weight(fitter, 2.0)
    assert mm.update_best_model({"accuracy": 0.5, "loss": 0.1}, path) is False
    _set_weight(fitter, 3.0)
    assert mm.update_best_model({"accuracy": 0.6, "loss": 0.1}, path) is False  # a tie is no improvement
    tensors, meta = load_model(path)
    np.testing.assert_array_equal(tensors["0.weight"], np.full((2, 3), 1.0, np.float32))
    assert meta["metrics"] == {"accuracy": 0.6, "loss": 0.9}
    assert mm.best_metrics == {"accuracy": 0.6, "loss": 0.9}
    _set_weight(fitter, 4.0)
    assert mm.update_best_model({"accuracy": 0.7}, path) is True
    tensors, meta = load_model(path)
    np.testing.assert_array_equal(tensors["0.weight"], np.full((2, 3), 4.0, np.float32))
    assert meta["metrics"] == {"accuracy": 0.7}
    np.testing.assert_array_equal(mm.get_best_model()["0.weight"], np.full((2, 3), 4.0, np.float32))
    assert set(tensors) == set(fitter.model.state_dict())


def test_best_model_by_loss_keeps_the_lowest(tmp_path):
    fitter = TinyFitter()
    mm = _manager(fitter)
    path = tmp_path / "best.fl"
    _set_weight(fitter, 1.0)
    assert mm.update_best_model({"loss": 0.5}, path) is True
    _set_weight(fitter, 2.0)
    assert mm.update_best_model({"loss": 0.8}, path) is False
    _set_weight(fitter, 3.0)
    assert mm.update_best_model({"loss": 0.2}, path) is True
    tensors, meta = load_model(path)
    np.testing.assert_array_equal(tensors["0.weight"], np.full((2, 3), 3.0, np.float32))
    assert meta["metrics"] == {"loss": 0.2}


def test_best_model_is_a_snapshot_not_the_live_module(tmp_path):
    fitter = TinyFitter()
    mm = _manager(fitter)
    _set_weight(fitter, 1.0)
    mm.update_best_model({"accuracy": 0.9})
    _set_weight(fitter, 5.0)
    np.testing.assert_array_equal(mm.get_best_model()["0.weight"], np.full((2, 3), 1.0, np.float32))


def test_best_model_without_a_path_writes_nothing(tmp_path):
    fitter = TinyFitter()
    mm = _manager(fitter)
    assert mm.update_best_model({"accuracy": 0.9}) is True
    assert list(tmp_path.iterdir()) == []


def test_best_model_by_a_named_loss_keeps_the_lowest():
    fitter = TinyFitter()
    mm = _manager(fitter)
    assert mm.update_best_model({"val_loss": 0.5}) is True
    assert mm.update_best_model({"val_loss": 0.9}) is False


def test_validate_returns_the_fitters_metrics_as_floats():
    fitter = TinyFitter(metrics={"accuracy": 1, "loss": np.float32(0.25)})
    metrics = _manager(fitter).validate()
    assert metrics == {"accuracy": 1.0, "loss": 0.25}
    assert all(type(v) is float for v in metrics.values())


@pytest.mark.parametrize(
    "raw, message",
    [
        ([0.5], "non-empty dict"),
        ({}, "non-empty dict"),
        (None, "non-empty dict"),
        ({"accuracy": "high"}, "metric 'accuracy' is not a number"),
        ({"accuracy": None}, "metric 'accuracy' is not a number"),
        ({"loss": float("nan")}, "metric 'loss' is not finite"),
        ({"loss": math.inf}, "metric 'loss' is not finite"),
    ],
    ids=["list", "empty", "none", "string", "none-value", "nan", "inf"],
)
def test_validator_refuses_unusable_metrics(raw, message):
    with pytest.raises(ValueError, match=message):
        ModelValidator().validate(TinyFitter(metrics=raw))


def test_model_processor_extracts_copies_and_applies_minus_excluded():
    fitter = TinyFitter()
    proc = ModelProcessor()
    arrays = proc.extract_model(fitter)
    arrays["0.bias"][:] = 42.0
    assert not torch.equal(fitter.model[0].bias, torch.full((2,), 42.0))
    assert (
        proc.apply_model(
            fitter,
            {"0.bias": np.full(2, 3.0, np.float32), "0.weight": np.full((2, 3), 3.0, np.float32)},
            exclude_vars=r"bias",
        )
        is True
    )
    assert torch.equal(fitter.model[0].weight, torch.full((2, 3), 3.0))
    assert not torch.equal(fitter.model[0].bias, torch.full((2,), 3.0))
    assert proc.apply_model(fitter, {"0.weight": np.full((2, 3), 3.0, np.float32)}) is False


def test_close_drops_models_and_fitter():
    fitter = TinyFitter()
    mm = _manager(fitter)
    mm.assign_current_model({TASK: _global_model(fitter)})
    mm.update_best_model({"accuracy": 1.0})
    mm.close()
    assert mm.get_best_model() is None and mm.get_fitter() is None and mm.model_vars(TASK) == []


def test_delta_w_of_a_model_with_a_bool_buffer_is_built():
    fitter = TinyFitter()
    fitter.model[0].register_buffer("mask", torch.tensor([True, False]))
    mm = _manager(fitter)
    mm.assign_current_model({TASK: _module_arrays(fitter)})
    fitter.train(None)
    delta = mm.read_current_model(TASK, "delta_w")
    np.testing.assert_array_equal(delta["0.bias"], np.full(2, 0.25, np.float32))


def test_an_update_without_a_privacy_filter_is_computed_a_variable_at_a_time_as_it_is_read():
    _, mm, glob = _trained_round()
    delta = mm.read_current_model(TASK, "delta_w")
    assert not isinstance(delta, dict) and len(delta) == len(glob) and list(delta) == list(glob)
    first, again = delta["0.weight"], delta["0.weight"]
    assert first is not again  # nothing is kept: each read computes the difference anew
    np.testing.assert_array_equal(first, again)
    with pytest.raises(KeyError):
        delta["not-a-variable"]


# ---- the global model: decoded into the local model, kept on disk ------------------------------------------


def _params(fitter: TinyFitter) -> dict[str, np.ndarray]:
    """Numpy views of the module's own memory."""
    return {k: v.numpy() for k, v in fitter.model.state_dict().items()}


def _spec(name: str, arr: np.ndarray) -> TensorSpec:
    return TensorSpec(name, arr.dtype, arr.shape)


def _fds_in(folder: Path) -> list[int]:
    """This process's open files that live in `folder` (named or not)."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{folder}/"):
                fds.append(int(fd))
        except OSError:
            continue
    return fds


def test_a_download_decodes_straight_into_the_modules_own_memory():
    fitter = TinyFitter()
    mm = _manager(fitter)
    before = {k: v.data_ptr() for k, v in fitter.model.state_dict().items()}
    glob = _global_model(fitter)
    decoded = decode_tensors(encode_tensors(glob), sink=mm.global_model_sink(TASK))
    own = _params(fitter)
    for name, arr in decoded.items():
        assert np.shares_memory(arr, own[name]), name  # no receive buffer of its own
        np.testing.assert_array_equal(own[name], glob[name], err_msg=name)
    assert mm.local_model_partial  # written, not yet assigned
    assert mm.assign_current_model({TASK: decoded}) is True
    assert not mm.local_model_partial
    assert {k: v.data_ptr() for k, v in fitter.model.state_dict().items()} == before
    for name, arr in _module_arrays(fitter).items():
        np.testing.assert_array_equal(arr, glob[name], err_msg=name)


def test_the_sink_declines_what_the_local_model_cannot_take_in_place():
    fitter = TinyFitter()
    mm = _manager(fitter, exclude_vars=r"bias")
    sink = mm.global_model_sink(TASK)
    weight = _params(fitter)["0.weight"]
    assert sink(_spec("0.bias", np.zeros(2, np.float32))) is None  # excluded: the local value stays
    assert sink(_spec("0.weight", np.zeros((3, 2), np.float32))) is None  # another shape
    assert sink(_spec("0.weight", np.zeros((2, 3), np.float64))) is None  # another dtype
    assert sink(_spec(SCAFFOLD_CONTROL_PREFIX + "0.weight", weight)) is None  # SCAFFOLD's c is not a variable
    assert sink(_spec("not-a-variable", weight)) is None
    assert not mm.local_model_partial
    assert np.shares_memory(sink(_spec("0.weight", weight)), weight)


def test_a_variable_one_tasks_download_wrote_is_not_offered_to_another_task():
    fitter = TinyFitter()
    mm = ClientModelManager(task_names=["a", "b"])
    mm.set_fitter(fitter)
    weight = _params(fitter)["0.weight"]
    assert mm.global_model_sink("a")(_spec("0.weight", weight)) is not None
    assert mm.global_model_sink("b")(_spec("0.weight", weight)) is None
    assert mm.global_model_sink("a")(_spec("0.weight", weight)) is not None  # a retry of a's download


def test_a_reader_writer_without_writable_arrays_gets_no_sink():
    class Plain(ModelProcessor):
        writable_model = None

    assert _manager(TinyFitter(), model_reader_writer=Plain()).global_model_sink(TASK) is None
    assert _manager().global_model_sink(TASK) is None  # no fitter yet


def test_a_download_that_breaks_off_leaves_a_partial_local_model_that_refuses_an_update_until_pulled_again():
    fitter, mm, glob = _trained_round()
    nxt = _global_model(fitter, offset=2.0)
    chunks = list(encode_tensors(nxt))
    with pytest.raises(CodecError, match="stream ended early"):
        decode_tensors(chunks[:-1], sink=mm.global_model_sink(TASK))
    assert mm.local_model_partial
    for type_str in ("delta_w", "model"):
        with pytest.raises(RuntimeError, match=r"local model is incomplete: a download of task 'task'.*pull .* again"):
            mm.read_current_model(TASK, type_str)
    # the retry: the whole model again, then assigned
    mm.assign_current_model({TASK: decode_tensors(encode_tensors(nxt), sink=mm.global_model_sink(TASK))})
    assert not mm.local_model_partial
    fitter.train(None)
    np.testing.assert_array_equal(mm.read_current_model(TASK)["0.bias"], np.full(2, 0.25, np.float32))


def test_a_failed_assign_leaves_the_local_model_partial():
    fitter = TinyFitter()
    mm = _manager(fitter)
    decoded = decode_tensors(encode_tensors(_global_model(fitter)), sink=mm.global_model_sink(TASK))
    decoded["unknown"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match="'unknown' is not in the local model"):
        mm.assign_current_model({TASK: decoded})
    assert mm.local_model_partial


def test_the_update_is_local_minus_the_global_model_read_back_from_disk():
    fitter = TinyFitter()
    mm = _manager(fitter)
    glob = _global_model(fitter, offset=0.5)
    kept = {k: v.copy() for k, v in glob.items()}
    mm.assign_current_model({TASK: glob})
    for arr in glob.values():  # what was in memory is gone: only the file can give the global model back
        arr.fill(99)
    fitter.train(None)
    local = _module_arrays(fitter)
    delta = mm.read_current_model(TASK, "delta_w")
    for name in kept:
        np.testing.assert_array_equal(delta[name], local[name] - kept[name], err_msg=name)


def test_the_global_model_file_is_private_one_per_task_and_removed_when_released(tmp_path):
    fitter = TinyFitter()
    mm = _manager(fitter)
    mm.global_model_dir = tmp_path
    mm.assign_current_model({TASK: _global_model(fitter)})
    [fd] = _fds_in(tmp_path)
    assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600 and os.fstat(fd).st_nlink == 0
    mm.assign_current_model({TASK: _global_model(fitter, offset=3.0)})
    assert len(_fds_in(tmp_path)) == 1  # the next round's model replaced it
    assert list(tmp_path.iterdir()) == []  # never a name in the folder
    mm.release_global_models()
    assert _fds_in(tmp_path) == [] and mm.model_vars(TASK) == []
    mm.assign_current_model({TASK: _global_model(fitter)})
    mm.close()
    assert _fds_in(tmp_path) == []


def test_an_in_memory_best_model_is_never_decoded_over():
    from fedclient.direct_client import _DictReaderWriter, _Weights

    weights = _Weights()
    weights.weights = {"w": np.ones(3, np.float32)}
    mm = ClientModelManager(task_names=[TASK], model_reader_writer=_DictReaderWriter())
    mm.set_fitter(weights)
    sink = mm.global_model_sink(TASK)
    assert sink(_spec("w", weights.weights["w"])) is weights.weights["w"]
    mm.update_best_model({"accuracy": 0.9})  # kept in memory: the very arrays of the weights
    assert mm.global_model_sink(TASK)(_spec("w", weights.weights["w"])) is None
    np.testing.assert_array_equal(mm.get_best_model()["w"], np.ones(3, np.float32))


# ---- the global copy written while the download streams; the update read ahead -----------------------------------


def _download(mm: ClientModelManager, model: dict[str, np.ndarray], cut: int = 0) -> dict[str, np.ndarray]:
    """Decode `model` (less its last `cut` chunks) as the communicator does, through a download of the manager's."""
    download = mm.global_model_download(TASK)
    chunks = list(encode_tensors(model))
    try:
        decoded = decode_tensors(chunks[: len(chunks) - cut], download.sink, download.on_tensor)
    except BaseException:
        download.abort()
        raise
    download.complete()
    return decoded


def _no_copy_at_assign(monkeypatch) -> None:
    from fedclient import model_manager

    def refuse(*args, **kwargs):
        raise AssertionError("assign_current_model wrote the global copy again")

    monkeypatch.setattr(model_manager, "GlobalModelFile", refuse)


def _alive(thread_name: str) -> bool:
    return any(t.name == thread_name and t.is_alive() for t in threading.enumerate())


def _assert_update_after_training(fitter: TinyFitter, mm: ClientModelManager, glob: dict[str, np.ndarray]) -> None:
    """Train once; the update must be the local model minus `glob`, variable by variable."""
    fitter.train(None)
    local = _module_arrays(fitter)
    delta = mm.read_current_model(TASK)
    assert set(delta) == {k for k in glob if local[k].dtype != np.bool_}
    for name in delta:
        np.testing.assert_array_equal(delta[name], local[name] - glob[name], err_msg=name)


def test_the_global_copy_is_written_while_the_download_streams_and_assign_takes_it(monkeypatch):
    fitter = TinyFitter()
    mm = _manager(fitter)
    glob = _global_model(fitter, offset=0.5)
    expected = {k: v.copy() for k, v in glob.items()}
    decoded = _download(mm, glob)
    _no_copy_at_assign(monkeypatch)
    assert mm.assign_current_model({TASK: decoded}) is True
    assert not mm.local_model_partial and not _alive("global-model-writer")
    assert mm.model_vars(TASK) == list(expected)
    _assert_update_after_training(fitter, mm, expected)


def test_excluded_variables_and_scaffolds_control_variate_are_not_written_to_the_global_copy(monkeypatch):
    fitter = TinyFitter()
    mm = _manager(fitter, exclude_vars=r"bias")
    glob = _global_model(fitter)
    control = {SCAFFOLD_CONTROL_PREFIX + "0.weight": np.ones((2, 3), np.float32)}
    decoded = _download(mm, {**glob, **control})
    writer = mm._downloads[TASK]._writer
    assert set(writer) == {k for k in glob if "bias" not in k}
    _no_copy_at_assign(monkeypatch)
    mm.assign_current_model({TASK: {k: v for k, v in decoded.items() if k not in control}})
    assert mm.model_vars(TASK) == [k for k in glob if "bias" not in k]


def test_arrays_replaced_after_the_download_are_written_again_at_assign():
    fitter = TinyFitter()
    mm = _manager(fitter)
    decoded = _download(mm, _global_model(fitter))
    changed = {k: v + 1 for k, v in decoded.items()}  # as a post-processing step would
    mm.assign_current_model({TASK: changed})
    _assert_update_after_training(fitter, mm, changed)


def test_a_broken_download_drops_both_copies_and_refuses_the_update_until_a_pull_completes(tmp_path):
    class Plain(ModelProcessor):  # no arrays offered: the local model stays whole, only the global copy is gone
        writable_model = None

    fitter = TinyFitter()
    mm = _manager(fitter, model_reader_writer=Plain())
    mm.global_model_dir = tmp_path
    mm.assign_current_model({TASK: _global_model(fitter)})
    assert len(_fds_in(tmp_path)) == 1
    with pytest.raises(CodecError, match="stream ended early"):
        _download(mm, _global_model(fitter, offset=2.0), cut=1)
    assert _fds_in(tmp_path) == [] and not _alive("global-model-writer")  # one copy per task, and this one broke
    assert mm.local_model_partial
    with pytest.raises(RuntimeError, match=r"global model of task 'task' is incomplete.*pull .* again"):
        mm.read_current_model(TASK)
    nxt = _global_model(fitter, offset=2.0)
    expected = {k: v.copy() for k, v in nxt.items()}
    mm.assign_current_model({TASK: _download(mm, nxt)})
    assert len(_fds_in(tmp_path)) == 1 and not mm.local_model_partial
    _assert_update_after_training(fitter, mm, expected)
    mm.close()
    assert _fds_in(tmp_path) == []


def test_a_variable_sent_twice_is_refused_and_nothing_is_kept():
    fitter = TinyFitter()
    mm = _manager(fitter)
    glob = _global_model(fitter)
    first = next(iter(glob))
    download = mm.global_model_download(TASK)
    chunks = [*encode_tensors(glob), *encode_tensors({first: glob[first] + 5})]
    with pytest.raises(CodecError, match="appears twice"):
        decode_tensors(chunks, download.sink, download.on_tensor)
    download.abort()
    np.testing.assert_array_equal(_params(fitter)[first], glob[first])  # the repeat did not land in the model
    assert mm.local_model_partial and not _alive("global-model-writer")


def test_a_failed_write_of_the_global_copy_fails_the_pull_naming_the_variable(monkeypatch):
    fitter = TinyFitter()
    mm = _manager(fitter)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match=r"cannot keep task 'task'.*variable '0.weight'.*No space left"):
        mm.assign_current_model({TASK: _download(mm, _global_model(fitter))})
    assert mm.local_model_partial and not _alive("global-model-writer")
    with pytest.raises(RuntimeError, match="incomplete"):
        mm.read_current_model(TASK)


def _big_round(n: int = 12, size: int = 20_000) -> tuple[ClientModelManager, dict, dict[str, np.ndarray]]:
    """A manager of dict weights that received a global model of `n` float32 variables and then changed them."""
    from fedclient.direct_client import _DictReaderWriter, _Weights

    weights = _Weights()
    rng = np.random.default_rng(5)
    glob = {f"v{i}": rng.random(size + i, dtype=np.float32) for i in range(n)}
    mm = ClientModelManager(task_names=[TASK], model_reader_writer=_DictReaderWriter())
    mm.set_fitter(weights)
    mm.assign_current_model({TASK: {k: v.copy() for k, v in glob.items()}})
    for i, arr in enumerate(weights.weights.values()):
        arr += i
    expected = {k: weights.weights[k] - glob[k] for k in glob}
    return mm, weights, expected


def test_the_update_stream_reads_ahead_into_a_few_reused_buffers():
    mm, _, expected = _big_round()
    update = mm.read_current_model(TASK)
    buffers = set()
    got = []
    for name, diff in update.stream():
        np.testing.assert_array_equal(diff, expected[name], err_msg=name)  # valid until the next one is taken
        buffers.add(diff.ctypes.data)
        got.append(name)
    assert got == list(expected)
    assert len(buffers) <= READ_AHEAD_VARIABLES + 1  # the one being sent and those read ahead
    assert not _alive("update-read-ahead")


def test_the_update_stream_reuses_buffers_of_mixed_sizes():
    from fedclient.direct_client import _DictReaderWriter, _Weights

    weights = _Weights()
    rng = np.random.default_rng(6)
    sizes = [16384, 4096, 64, 16384, 4096, 640, 10, 16384, 4096, 64]  # a small network's layers, weight then bias
    glob = {f"v{i}": rng.random(n, dtype=np.float32) for i, n in enumerate(sizes)}
    mm = ClientModelManager(task_names=[TASK], model_reader_writer=_DictReaderWriter())
    mm.set_fitter(weights)
    mm.assign_current_model({TASK: {k: v.copy() for k, v in glob.items()}})
    for i, arr in enumerate(weights.weights.values()):
        arr += i
    for _ in range(3):  # each stream starts with no free buffer and reuses what earlier variables gave back
        got = []
        for name, diff in mm.read_current_model(TASK).stream():
            np.testing.assert_allclose(diff, weights.weights[name] - glob[name], err_msg=name)
            got.append(name)
        assert got == list(glob)
    assert not _alive("update-read-ahead")


def test_read_ahead_stays_within_its_byte_budget(monkeypatch):
    from fedclient import model_manager

    monkeypatch.setattr(model_manager, "READ_AHEAD_BYTES", 1)  # no room beyond the variable being sent
    mm, _, expected = _big_round()
    buffers = set()
    for name, diff in mm.read_current_model(TASK).stream():
        np.testing.assert_array_equal(diff, expected[name], err_msg=name)
        buffers.add(diff.ctypes.data)
    assert len(buffers) == 1


def test_an_update_stream_dropped_part_way_stops_its_thread():
    mm, _, expected = _big_round()
    stream = mm.read_current_model(TASK).stream()
    name, diff = next(stream)
    np.testing.assert_array_equal(diff, expected[name])
    assert _alive("update-read-ahead")
    stream.close()  # a transfer that broke off
    assert not _alive("update-read-ahead")


def test_a_read_ahead_that_fails_names_the_variable(monkeypatch):
    mm, _, _ = _big_round()
    reads = []

    def preadv(fd, buffers, offset):
        reads.append(offset)
        if len(reads) > 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    real = os.preadv
    monkeypatch.setattr(os, "preadv", preadv)
    with pytest.raises(OSError, match="variable 'v2'.*Input/output error"):
        for _ in mm.read_current_model(TASK).stream():
            pass
    assert not _alive("update-read-ahead")
