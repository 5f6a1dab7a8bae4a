"""Site-side algorithms an MMAR turns on in config_fed_client.json, without editing its trainer: FedProx, SCAFFOLD.

Both change the local gradient. `SiteAlgorithms` puts that change in an optimizer step pre-hook on the trainer's
model, so any torch optimizer the trainer builds gets it; a trainer may instead add `FedProx.term(model)` to its
loss itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedcommon.algorithms import SCAFFOLD_CONTROL_PREFIX, SCAFFOLD_DELTA_PREFIX
from fedcommon.mmar import ClientConfig, excluded
from fedcommon.model_file import load_model, save_model
from fedcommon.torch_state import numpy_to_tensor, tensor_to_numpy

SCAFFOLD_STATE_FILE = "scaffold_site_state.fl"


def proximal_term(model: nn.Module, global_params: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """mu/2 * ||w - x||^2 over the model's parameters that have a global value: the term FedProx adds to the local
    objective (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, eq. 2)."""
    total = None
    for name, w in model.named_parameters():
        x = global_params.get(name)
        if x is not None:
            term = torch.sum((w - x) ** 2)
            total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * mu * total


class FedProx:
    """FedProx with weight mu: the global weights of the round are taken at its start; the gradient of the term,
    mu * (w - x), is added to each step's gradient (or a trainer adds `term(model)` to its loss)."""

    def __init__(self, mu: float) -> None:
        if not mu > 0:
            raise ValueError(f"fedprox mu must be > 0, got {mu}")
        self.mu = mu
        self.global_params: dict[str, torch.Tensor] = {}

    def start_round(self, model: nn.Module) -> None:
        """Keep the model's weights, just set to the global model, as x."""
        self.global_params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def term(self, model: nn.Module) -> torch.Tensor:
        return proximal_term(model, self.global_params, self.mu)

    @torch.no_grad()
    def correct_gradients(self, model: nn.Module, lrs: Mapping[int, float]) -> None:
        for name, w in model.named_parameters():
            x = self.global_params.get(name)
            if w.grad is not None and x is not None:
                w.grad.add_(w - x, alpha=self.mu)


class Scaffold:
    """SCAFFOLD at a site, option II control variates (Karimireddy et al., "SCAFFOLD: Stochastic Controlled
    Averaging for Federated Learning", ICML 2020, Algorithm 1).

    Each local step's gradient g becomes g - c_i + c; after the round c_i+ = c_i - c + (x - y) / (K * lr) and
    delta c_i = c_i+ - c_i goes to the server beside the update. K * lr is summed step by step (the learning rate
    in force at each step), and a step of SGD with momentum m counts lr / (1 - m), its long-run step size: option
    II assumes plain SGD, this keeps its estimate of the mean gradient for heavy-ball trainers too.
    c_i is saved in `state_path` once the server has the update (`commit`), so it survives a site restart.
    """

    def __init__(self, state_path: Path, exclude_vars: tuple[str, ...] | str = ()) -> None:
        self.state_path = Path(state_path)
        self.exclude_vars = exclude_vars
        self.c_i: dict[str, torch.Tensor] = {}
        self.rounds = 0
        if self.state_path.exists():
            arrays, meta = load_model(self.state_path)
            self.c_i = {n: numpy_to_tensor(a) for n, a in arrays.items()}
            self.rounds = int(meta.get("rounds", 0))
        self.c: dict[str, torch.Tensor] = {}
        self.x: dict[str, torch.Tensor] = {}
        self.lr_sum: dict[str, float] = {}
        self._pending: dict[str, torch.Tensor] | None = None

    def variables(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's variables that carry a control variate: every floating one not excluded."""
        return {
            n: t for n, t in model.state_dict().items() if t.is_floating_point() and not excluded(n, self.exclude_vars)
        }

    def start_round(self, model: nn.Module, c: Mapping[str, np.ndarray]) -> None:
        """Begin a round from the global model just loaded into `model` and the server's c (absent: zeros)."""
        variables = self.variables(model)
        self.x = {n: t.detach().clone() for n, t in variables.items()}
        self.c = {
            n: numpy_to_tensor(c[n]).to(t.device) if n in c else torch.zeros_like(t) for n, t in variables.items()
        }
        self.c_i = {n: self.c_i[n].to(t.device) if n in self.c_i else torch.zeros_like(t) for n, t in variables.items()}
        self.lr_sum = dict.fromkeys(variables, 0.0)
        self._pending = None

    @torch.no_grad()
    def correct_gradients(self, model: nn.Module, lrs: Mapping[int, float]) -> None:
        for name, w in model.named_parameters():
            if name in self.c and w.grad is not None:
                w.grad.add_(self.c[name] - self.c_i[name])
                self.lr_sum[name] += lrs.get(id(w), 0.0)

    @torch.no_grad()
    def finish_round(self, model: nn.Module) -> dict[str, np.ndarray]:
        """delta c_i of every variable, named for the wire (SCAFFOLD_DELTA_PREFIX + name); `commit` keeps c_i+."""
        new, deltas = {}, {}
        for name, y in self.variables(model).items():
            steps = self.lr_sum.get(name, 0.0)
            if steps > 0:
                new[name] = self.c_i[name] - self.c[name] + (self.x[name] - y) / steps
            else:  # a buffer, or a parameter no step changed: no gradient to estimate
                new[name] = self.c_i[name].clone()
            deltas[SCAFFOLD_DELTA_PREFIX + name] = tensor_to_numpy(new[name] - self.c_i[name])
        self._pending = new
        return deltas

    def commit(self) -> None:
        """The server accepted the update: c_i <- c_i+, saved atomically."""
        if self._pending is None:
            return
        self.c_i, self._pending = self._pending, None
        self.rounds += 1
        save_model(self.state_path, {n: tensor_to_numpy(t) for n, t in self.c_i.items()}, {"rounds": self.rounds})


def split_control(received: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The global model the server sent, and SCAFFOLD's server control variate c that came with it."""
    model, control = {}, {}
    for name, arr in received.items():
        if name.startswith(SCAFFOLD_CONTROL_PREFIX):
            control[name[len(SCAFFOLD_CONTROL_PREFIX) :]] = arr
        else:
            model[name] = arr
    return model, control


def _effective_lrs(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    out = {}
    for group in optimizer.param_groups:
        lr = float(group.get("lr", 0.0))
        momentum = group.get("momentum", 0.0)
        if isinstance(optimizer, torch.optim.SGD) and momentum and not group.get("nesterov", False):
            lr /= 1.0 - momentum * (1.0 - group.get("dampening", 0.0))
        for p in group["params"]:
            out[id(p)] = lr
    return out


class SiteAlgorithms:
    """The site algorithms of a run (FedProx, SCAFFOLD), applied to the trainer's model round by round."""

    def __init__(
        self,
        fedprox_mu: float | None = None,
        scaffold_state: Path | None = None,
        exclude_vars: tuple[str, ...] | str = (),
    ) -> None:
        self.fedprox = FedProx(fedprox_mu) if fedprox_mu is not None else None
        self.scaffold = Scaffold(scaffold_state, exclude_vars) if scaffold_state is not None else None
        self._hook = None

    @classmethod
    def from_config(cls, config: ClientConfig, run_dir: Path) -> SiteAlgorithms:
        """As config_fed_client.json says; SCAFFOLD's c_i lives in the run's folder."""
        state = Path(run_dir) / SCAFFOLD_STATE_FILE if config.scaffold else None
        return cls(config.fedprox_mu, state, config.exclude_vars)

    @property
    def active(self) -> bool:
        return self.fedprox is not None or self.scaffold is not None

    @property
    def names(self) -> list[str]:
        """For metrics and logs: "FedProx(mu=0.01)", "SCAFFOLD"."""
        out = [f"FedProx(mu={self.fedprox.mu:g})"] if self.fedprox else []
        return out + (["SCAFFOLD"] if self.scaffold else [])

    def begin_round(self, model: nn.Module, control: Mapping[str, np.ndarray]) -> None:
        """After the global model is loaded into `model`: take x (and c), and correct every optimizer step on it."""
        self.end_hook()
        if not self.active:
            return
        if self.fedprox:
            self.fedprox.start_round(model)
        if self.scaffold:
            self.scaffold.start_round(model, control)
        params = {id(p) for p in model.parameters()}
        algorithms = [a for a in (self.fedprox, self.scaffold) if a is not None]

        def before_step(optimizer, args, kwargs) -> None:
            if any(id(p) in params for group in optimizer.param_groups for p in group["params"]):
                lrs = _effective_lrs(optimizer)
                for algorithm in algorithms:
                    algorithm.correct_gradients(model, lrs)

        self._hook = register_optimizer_step_pre_hook(before_step)

    def end_round(self, model: nn.Module) -> dict[str, np.ndarray]:
        """After local training: the extra tensors to send with the update (SCAFFOLD's delta c_i)."""
        self.end_hook()
        return self.scaffold.finish_round(model) if self.scaffold else {}

    def commit(self) -> None:
        """The server accepted the round's update."""
        if self.scaffold:
            self.scaffold.commit()

    def end_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
