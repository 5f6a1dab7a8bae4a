"""FedProx and SCAFFOLD at a site, on a tiny torch model, against hand-computed steps."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedclient.site_algorithms import (
    SCAFFOLD_STATE_FILE,
    FedProx,
    Scaffold,
    SiteAlgorithms,
    proximal_term,
    split_control,
)
from fedcommon.algorithms import SCAFFOLD_CONTROL_PREFIX
from fedcommon.mmar import ClientConfig


class Tiny(nn.Module):
    """One parameter p and a buffer; the loss sum(a * p) has the constant gradient a."""

    def __init__(self, p):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scale", torch.ones(2, dtype=torch.float64))

    def loss(self, a):
        return torch.sum(torch.tensor(a, dtype=torch.float64) * self.p)


def _train(model, steps, lr=0.1, a=(1.0, 1.0), extra=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model.loss(a) + (extra(model) if extra else 0)
        loss.backward()
        optimizer.step()


def test_proximal_term_is_half_mu_times_squared_distance():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.copy_(torch.tensor([0.5]))
    zeros = {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}
    # 0.2/2 * (1 + 4 + 0.25) = 0.525
    assert proximal_term(model, zeros, 0.2).item() == pytest.approx(0.525)


def test_fedprox_hook_adds_mu_times_w_minus_x_to_each_step():
    # x = [1, 2]; step 1: grad 1 + 0.5*(w - x) = 1 -> w = [0.9, 1.9]; step 2: grad 1 + 0.5*(-0.1) = 0.95 ->
    # w = [0.805, 1.805].
    model = Tiny([1.0, 2.0])
    algorithms = SiteAlgorithms(fedprox_mu=0.5)
    algorithms.begin_round(model, {})
    _train(model, 2)
    assert algorithms.end_round(model) == {}
    np.testing.assert_allclose(model.p.detach().numpy(), [0.805, 1.805])
    # The hook is gone once the round ends: a plain step again.
    _train(model, 1)
    np.testing.assert_allclose(model.p.detach().numpy(), [0.705, 1.705])


def test_fedprox_as_a_loss_term_gives_the_same_steps():
    model = Tiny([1.0, 2.0])
    prox = FedProx(0.5)
    prox.start_round(model)
    _train(model, 2, extra=prox.term)
    np.testing.assert_allclose(model.p.detach().numpy(), [0.805, 1.805])


def test_fedprox_leaves_other_models_optimizers_alone():
    model, other = Tiny([1.0, 2.0]), Tiny([1.0, 2.0])
    algorithms = SiteAlgorithms(fedprox_mu=100.0)
    algorithms.begin_round(model, {})
    with torch.no_grad():
        other.p.add_(1.0)
    _train(other, 1)
    algorithms.end_round(model)
    np.testing.assert_allclose(other.p.detach().numpy(), [1.9, 2.9])


def test_scaffold_option_ii_two_rounds_and_a_restart(tmp_path: Path):
    state = tmp_path / SCAFFOLD_STATE_FILE
    a = (1.0, 2.0)
    # Round 1: c = [0.5, 0], c_i = 0: each of 2 steps (lr 0.1) follows a - c_i + c = [1.5, 2]: x - y = [0.3, 0.4];
    # c_i+ = 0 - [0.5, 0] + [0.3, 0.4] / (2 * 0.1) = [1, 2] (the mean raw gradient); delta c_i = [1, 2].
    model = Tiny([0.0, 0.0])
    site = SiteAlgorithms(scaffold_state=state)
    site.begin_round(model, {"p": np.array([0.5, 0.0]), "scale": np.zeros(2)})
    _train(model, 2, a=a)
    deltas = site.end_round(model)
    np.testing.assert_allclose(model.p.detach().numpy(), [-0.3, -0.4])
    assert set(deltas) == {"scaffold.delta_c:p", "scaffold.delta_c:scale"}
    np.testing.assert_allclose(deltas["scaffold.delta_c:p"], [1.0, 2.0])
    np.testing.assert_array_equal(deltas["scaffold.delta_c:scale"], [0.0, 0.0])
    assert not state.exists()  # kept only once the server has the update
    site.commit()

    # The site restarts. Round 2: c = [1, 1], c_i = [1, 2]: steps follow [1, 2] - [1, 2] + [1, 1] = [1, 1];
    # 3 steps: x - y = [0.3, 0.3]; c_i+ = [1, 2] - [1, 1] + [0.3, 0.3] / 0.3 = [1, 2]: delta c_i = 0.
    restarted = SiteAlgorithms(scaffold_state=state)
    np.testing.assert_allclose(restarted.scaffold.c_i["p"].numpy(), [1.0, 2.0])
    model = Tiny([0.0, 0.0])
    restarted.begin_round(model, {"p": np.array([1.0, 1.0])})
    _train(model, 3, a=a)
    np.testing.assert_allclose(model.p.detach().numpy(), [-0.3, -0.3])
    np.testing.assert_allclose(restarted.end_round(model)["scaffold.delta_c:p"], [0.0, 0.0], atol=1e-12)


def test_scaffold_counts_a_momentum_step_at_its_long_run_size(tmp_path: Path):
    # SGD lr 0.1, momentum 0.5, constant gradient g = [1, 2], c = c_i = 0: steps move 0.1*g then 0.1*1.5*g:
    # x - y = 0.25*g; the steps count 2 * 0.1 / (1 - 0.5) = 0.4, so c_i+ = 0.625*g.
    model = Tiny([0.0, 0.0])
    scaffold = Scaffold(tmp_path / "s.fl")
    site = SiteAlgorithms()
    site.scaffold = scaffold
    site.begin_round(model, {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model.loss((1.0, 2.0)).backward()
        optimizer.step()
    np.testing.assert_allclose(site.end_round(model)["scaffold.delta_c:p"], [0.625, 1.25])


def test_scaffold_sends_no_delta_c_for_excluded_variables(tmp_path: Path):
    scaffold = Scaffold(tmp_path / "s.fl", exclude_vars=("scale",))
    model = Tiny([0.0, 0.0])
    scaffold.start_round(model, {})
    assert set(scaffold.finish_round(model)) == {"scaffold.delta_c:p"}


def test_from_config_and_split_control(tmp_path: Path):
    config = ClientConfig(
        task_name="t",
        exclude_vars=(),
        weight_by="samples",
        retry_timeout=1.0,
        heartbeat_interval=None,
        privacy=None,
        cross_site_validate=False,
        fedprox_mu=0.01,
        scaffold=True,
    )
    algorithms = SiteAlgorithms.from_config(config, tmp_path)
    assert algorithms.names == ["FedProx(mu=0.01)", "SCAFFOLD"]
    assert algorithms.scaffold.state_path == tmp_path / SCAFFOLD_STATE_FILE
    model, control = split_control({"w": np.zeros(1), SCAFFOLD_CONTROL_PREFIX + "w": np.ones(1)})
    assert list(model) == ["w"] and list(control) == ["w"]
