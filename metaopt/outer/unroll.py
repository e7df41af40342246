"""Inner training runs, many at once: the computation every gradient estimator differentiates or samples.

A batch of P inner runs (:class:`Runs`) is advanced together: one vectorised loss and gradient
over the task axis, one call of the optimizer's update on the ``[P, n]`` parameters. The
meta-objective of a run is the mean over its steps of the normalised loss,

    M = (1/T) Σ_{t=1..T} min(L(θ_t) / L(θ_0), cap)

(Maheswaranathan et al., NeurIPS 2021: normalising by the initial loss makes tasks comparable; the
cap keeps one diverging run from dominating a meta-batch, and a non-finite loss counts as the cap).
A truncation of K steps covers t = s+1..s+K, so the truncations of one run partition M.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch import Tensor

from metaopt.outer.families import Data, TaskFamily

State = dict[str, Tensor]


class FunctionalOptimizer(Protocol):
    """What an inner run needs from an optimizer: learned ones and the baselines alike."""

    def init_state(self, phi: dict[str, Tensor], theta: Tensor) -> State: ...

    def update(self, phi: dict[str, Tensor], state: State, theta: Tensor, grad: Tensor) -> tuple[Tensor, State]: ...


@dataclass
class Runs:
    """P inner runs: parameters, optimizer state, position, normaliser and task of each."""

    theta: Tensor  # [P, n]
    state: State  # [P] or [P, n, ...] entries
    step: Tensor  # [P] int64: inner steps taken
    length: Tensor  # [P] int64: steps this run will take before it is replaced
    loss0: Tensor  # [P]: L(θ_0), the normaliser
    data: Data  # [P, ...] entries
    seeds: Tensor  # [P] int64: task seeds (minibatch streams)

    @property
    def size(self) -> int:
        return int(self.theta.shape[0])

    def detach(self) -> Runs:
        return Runs(self.theta.detach(), {k: v.detach() for k, v in self.state.items()}, self.step, self.length,
                    self.loss0, self.data, self.seeds)

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> Runs:
        return cls(**d)

    def replace_rows(self, rows: Tensor, new: Runs) -> Runs:
        """These runs with ``rows`` taken from ``new`` (``new.size == len(rows)``); differentiable in ``new``."""

        def put(old: Tensor, value: Tensor) -> Tensor:
            return old.index_put((rows,), value.to(old.dtype))

        return Runs(put(self.theta, new.theta), {k: put(v, new.state[k]) for k, v in self.state.items()},
                    put(self.step, new.step), put(self.length, new.length), put(self.loss0, new.loss0),
                    {k: put(v, new.data[k]) for k, v in self.data.items()}, put(self.seeds, new.seeds))

    def repeat(self, times: int) -> Runs:
        """The runs stacked ``times`` times (antithetic particles sharing their tasks)."""

        def rep(x: Tensor) -> Tensor:
            return torch.cat([x] * times)

        return Runs(rep(self.theta), {k: rep(v) for k, v in self.state.items()}, rep(self.step), rep(self.length),
                    rep(self.loss0), {k: rep(v) for k, v in self.data.items()}, rep(self.seeds))


def start_runs(family: TaskFamily, opt: FunctionalOptimizer, phi: dict[str, Tensor], seeds: list[int],
               lengths: Tensor | int) -> Runs:
    """Fresh runs on the tasks with these seeds; the optimizer state is built from ``phi`` (in its graph)."""
    theta0, data = family.sample(seeds)
    p = theta0.shape[0]
    device = theta0.device
    seed_t = torch.tensor([int(s) for s in seeds], dtype=torch.int64, device=device)
    step = torch.zeros(p, dtype=torch.int64, device=device)
    with torch.no_grad():
        loss0 = family.loss(theta0, family.step_data(data, seed_t, step))
    # A run that starts at its minimum has nothing to normalise by; guard the division only.
    loss0 = loss0.clamp_min(torch.finfo(loss0.dtype).tiny)
    length = torch.as_tensor(lengths, dtype=torch.int64, device=device).expand(p).clone()
    return Runs(theta0, opt.init_state(phi, theta0), step, length, loss0, data, seed_t)


def normalised(loss: Tensor, loss0: Tensor, cap: float) -> Tensor:
    ratio = loss / loss0
    return torch.nan_to_num(ratio, nan=cap, posinf=cap, neginf=cap).clamp(max=cap)


def _loss_and_grad(family: TaskFamily, theta: Tensor, data: Data, differentiable: bool,
                   second_order: bool) -> tuple[Tensor, Tensor]:
    if not differentiable:
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            loss = family.loss(leaf, data)
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        return loss.detach(), grad
    if not theta.requires_grad:  # the first step of a truncation: θ does not depend on φ yet
        theta = theta.detach().requires_grad_(True)
    loss = family.loss(theta, data)
    # Runs are independent, so the gradient of the sum is each run's own gradient. The loss stays
    # in the graph (it is scored); second_order=False drops ∂g/∂θ from the meta-gradient.
    (grad,) = torch.autograd.grad(loss.sum(), theta, create_graph=second_order, retain_graph=True)
    return loss, grad


def unroll(family: TaskFamily, opt: FunctionalOptimizer, phi: dict[str, Tensor], runs: Runs, steps: int, *,
           differentiable: bool = False, second_order: bool = True, cap: float = 10.0,
           curve: bool = False) -> tuple[Runs, Tensor, Tensor | None]:
    """Advance every run ``steps`` steps.

    Returns the runs after, each run's mean normalised loss over the ``steps`` scored points
    (θ after each update), ``[P]``, and with ``curve=True`` the normalised losses ``[steps, P]``.
    ``differentiable=True`` keeps the graph from ``phi`` (and from ``runs``' tensors) to the losses.
    """
    theta, state = runs.theta, runs.state
    scored = []
    losses = [] if curve else None
    grad_ctx = torch.enable_grad() if differentiable else torch.no_grad()
    with grad_ctx:
        for k in range(steps + 1):
            data = family.step_data(runs.data, runs.seeds, runs.step + k)
            if k == steps:  # the last scored point needs the loss only
                loss = family.loss(theta, data)
            else:
                loss, grad = _loss_and_grad(family, theta, data, differentiable, second_order)
            if k > 0:
                value = normalised(loss, runs.loss0, cap)
                scored.append(value)
                if losses is not None:
                    losses.append(value.detach())
            if k < steps:
                delta, state = opt.update(phi, state, theta, grad)
                theta = theta + delta
    seg = torch.stack(scored).mean(0)
    after = Runs(theta, state, runs.step + steps, runs.length, runs.loss0, runs.data, runs.seeds)
    return after, seg, (torch.stack(losses) if losses is not None else None)


@torch.no_grad()
def evaluate(family: TaskFamily, opt: FunctionalOptimizer, phi: dict[str, Tensor], seeds: list[int],
             horizon: int, cap: float = 10.0, chunk: int = 256) -> dict[str, Any]:
    """Run ``opt`` (one φ shared by all tasks) on the tasks with these seeds for ``horizon`` steps.

    Returns ``mean`` (the meta-objective averaged over tasks), ``final`` (mean normalised loss at
    step ``horizon``), ``curve`` (mean normalised loss at each step 1..horizon) and ``per_task``.
    """
    per_task, curves = [], []
    for start in range(0, len(seeds), chunk):
        part = seeds[start:start + chunk]
        runs = start_runs(family, opt, phi, part, horizon)
        _, seg, c = unroll(family, opt, phi, runs, horizon, cap=cap, curve=True)
        per_task.append(seg)
        curves.append(c)
    per_task_t = torch.cat(per_task)
    curve = torch.cat(curves, dim=1)
    return {"mean": float(per_task_t.mean()), "final": float(curve[-1].mean()),
            "curve": curve.mean(1).tolist(), "per_task": per_task_t.tolist()}

