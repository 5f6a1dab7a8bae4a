"""torch state_dict <-> numpy: exact round trips for every carried dtype, and refusals that name the variable."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from fedcommon.torch_state import (
    load_numpy_into_module,
    numpy_to_tensor,
    state_dict_to_numpy,
    tensor_to_numpy,
    writable_view,
)


def _net(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).to(dtype)


def _bits(t: torch.Tensor) -> list[int]:
    """The raw bit patterns of a float tensor, so -0.0, NaN payloads and subnormals compare exactly."""
    as_int = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype]
    return t.detach().contiguous().view(as_int).flatten().tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_through_numpy_preserves_every_bit(dtype):
    src = _net(dtype)
    with torch.no_grad():
        w = src[0].weight
        # values that a lossy conversion would change: -0.0, NaN, inf, the smallest subnormal
        w[0, 0], w[0, 1], w[0, 2] = -0.0, float("nan"), float("inf")
        w[0, 3] = torch.finfo(dtype).smallest_normal / 2
    arrays = state_dict_to_numpy(src.state_dict())
    dst = _net(dtype)
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    load_numpy_into_module(dst, arrays)
    for name, t in src.state_dict().items():
        got = dst.state_dict()[name]
        assert got.dtype == t.dtype
        if t.is_floating_point():
            assert _bits(got) == _bits(t), name
        else:
            assert torch.equal(got, t), name


def test_bfloat16_becomes_ml_dtypes_bfloat16_with_the_same_bits():
    t = torch.tensor([1.0, -2.5, 3.140625, 1e-38], dtype=torch.bfloat16)
    arr = tensor_to_numpy(t)
    assert arr.dtype == np.dtype(ml_dtypes.bfloat16)
    assert arr.view(np.int16).tolist() == t.view(torch.int16).tolist()
    back = numpy_to_tensor(arr)
    assert back.dtype == torch.bfloat16 and _bits(back) == _bits(t)


def test_int64_batchnorm_counter_round_trips_as_int64():
    src = _net()
    src.train()
    for _ in range(3):
        src(torch.randn(5, 4))
    arrays = state_dict_to_numpy(src.state_dict())
    counter = arrays["1.num_batches_tracked"]
    assert counter.dtype == np.int64 and counter.shape == () and int(counter) == 3
    dst = _net()
    changed = load_numpy_into_module(dst, arrays)
    assert dst[1].num_batches_tracked.dtype == torch.int64
    assert int(dst[1].num_batches_tracked) == 3
    assert "1.num_batches_tracked" in changed
    assert torch.equal(dst[1].running_mean, src[1].running_mean)


def test_state_dict_order_is_kept():
    net = _net()
    assert list(state_dict_to_numpy(net.state_dict())) == list(net.state_dict())


def test_load_returns_only_the_names_whose_values_changed():
    net = _net()
    arrays = state_dict_to_numpy(net.state_dict())
    arrays["0.bias"] = arrays["0.bias"] + np.float32(1)
    assert load_numpy_into_module(net, arrays) == ["0.bias"]
    assert load_numpy_into_module(net, arrays) == []


def test_load_writes_into_the_existing_parameters_in_place():
    net = _net()
    weight = net[0].weight
    load_numpy_into_module(net, {"0.weight": np.full((3, 4), 2.0, np.float32)})
    assert net[0].weight is weight
    assert torch.equal(weight, torch.full((3, 4), 2.0))


def test_load_refuses_an_unknown_variable_naming_it():
    with pytest.raises(ValueError, match="'2.weight' is not in the local model"):
        load_numpy_into_module(_net(), {"2.weight": np.zeros((3, 3), np.float32)})


def test_load_refuses_a_shape_mismatch_naming_the_variable():
    with pytest.raises(ValueError, match=r"variable '0\.weight'.*\[4, 3\].*\[3, 4\]"):
        load_numpy_into_module(_net(), {"0.weight": np.zeros((4, 3), np.float32)})


@pytest.mark.parametrize("wrong", [np.float64, np.float16, np.dtype(ml_dtypes.bfloat16)])
def test_load_refuses_a_dtype_mismatch_naming_the_variable(wrong):
    with pytest.raises(ValueError, match=r"variable '0\.bias'.*local model has torch\.float32"):
        load_numpy_into_module(_net(), {"0.bias": np.zeros(3, wrong)})


def test_load_refuses_a_float_array_for_the_int64_counter():
    with pytest.raises(ValueError, match="variable '1.num_batches_tracked'"):
        load_numpy_into_module(_net(), {"1.num_batches_tracked": np.array(3.0, np.float32)})


def test_refused_load_leaves_the_module_unchanged():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    arrays = {"0.bias": np.full(3, 7.0, np.float32), "0.weight": np.zeros((4, 3), np.float32)}
    with pytest.raises(ValueError, match="0.weight"):
        load_numpy_into_module(net, arrays)
    for name, t in net.state_dict().items():
        assert torch.equal(t, before[name]), f"{name} changed although the load was refused"


def test_arrays_are_copies_that_training_does_not_change():
    net = _net()
    arrays = state_dict_to_numpy(net.state_dict())
    snapshot = {k: v.copy() for k, v in arrays.items()}
    net.train()
    for _ in range(2):  # plain SGD by hand: torch.optim's first import costs seconds
        net.zero_grad()
        net(torch.randn(8, 4)).pow(2).sum().backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.5 * p.grad
    assert not torch.equal(net[0].weight, torch.from_numpy(snapshot["0.weight"])), "training did not move weights"
    for name, arr in arrays.items():
        np.testing.assert_array_equal(arr, snapshot[name], err_msg=name)


def test_loaded_module_does_not_alias_the_source_arrays():
    net = _net()
    arr = np.full((3, 4), 1.5, np.float32)
    load_numpy_into_module(net, {"0.weight": arr})
    arr[:] = 9.0
    assert torch.equal(net[0].weight, torch.full((3, 4), 1.5))


def test_tensor_that_requires_grad_converts_without_error():
    p = torch.nn.Parameter(torch.ones(2, 2))
    arr = tensor_to_numpy(p)
    arr[0, 0] = 5.0
    assert p[0, 0].item() == 1.0


def test_non_contiguous_array_converts_to_the_same_values():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4).T
    t = numpy_to_tensor(arr)
    assert t.shape == (4, 3) and np.array_equal(t.numpy(), arr)


def test_load_accepts_the_scalar_that_arithmetic_on_a_0d_counter_returns():
    net = _net()
    counter = state_dict_to_numpy(net.state_dict())["1.num_batches_tracked"] + 2  # np.int64, not an ndarray
    assert load_numpy_into_module(net, {"1.num_batches_tracked": counter}) == ["1.num_batches_tracked"]
    assert int(net[1].num_batches_tracked) == 2


def test_a_writable_view_is_the_tensors_own_memory_bfloat16_included():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64):
        t = torch.zeros(2, 3, dtype=dtype)
        view = writable_view(t)
        assert view is not None and view.shape == (2, 3) and view.flags.writeable
        view[1, 2] = 5
        assert t[1, 2].item() == 5, dtype
    assert writable_view(torch.zeros(2, 3, dtype=torch.bfloat16)).dtype == np.dtype(ml_dtypes.bfloat16)


def test_no_writable_view_of_a_strided_sparse_or_unsupported_tensor():
    assert writable_view(torch.zeros(3, 2).T) is None
    assert writable_view(torch.zeros(3, 2).to_sparse()) is None
    assert writable_view(torch.zeros(3, dtype=torch.complex64).conj()) is None
    assert writable_view(torch.zeros(3, dtype=torch.float8_e4m3fn)) is None


def test_loading_an_array_that_is_the_variables_own_memory_copies_nothing_and_counts_as_changed():
    net = _net()
    weight = net.state_dict()["0.weight"]
    view = writable_view(weight)
    view[:] = 0.5
    other = net.state_dict()["0.bias"].numpy().copy() + 1
    assert load_numpy_into_module(net, {"0.weight": view, "0.bias": other}) == ["0.weight", "0.bias"]
    assert net[0].weight.data_ptr() == view.ctypes.data and bool((net[0].weight == 0.5).all())
    np.testing.assert_array_equal(net[0].bias.detach().numpy(), other)
