"""Synthetic problems with known curvature: the testbeds of optimizer papers.

- :class:`NoisyQuadratic`: an ill-conditioned quadratic bowl whose centre random-walks (LODO).
- :class:`Rosenbrock`: the curved valley of Rosenbrock (1960).
- :class:`LinearRegression`: random least squares with controlled input covariance spectrum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from metaopt.tasks._common import (
    check_float,
    check_int,
    check_optional_int,
    generator,
    seeded_init,
)
from metaopt.tasks.base import Task
from metaopt.tasks.supervised import SupervisedTask


class ParameterVector(nn.Module):
    """A module whose only parameter is the point being optimised (``self.theta``)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(init.clone())

    def forward(self) -> torch.Tensor:
        return self.theta


def random_rotation(dim: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-distributed orthogonal matrix: QR of a Gaussian with the signs of diag(R) fixed.

    Without the sign fix the distribution of Q is not uniform (Mezzadri, "How to generate random
    matrices from the classical compact groups", Notices of the AMS, 2007).
    """
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _check_spectrum(eig_min: Any, eig_max: Any) -> tuple[float, float]:
    eig_min = check_float("eig_min", eig_min, positive=True)
    eig_max = check_float("eig_max", eig_max, positive=True)
    if eig_max < eig_min:
        raise ValueError(f"eig_max must be >= eig_min ({eig_min}), got {eig_max}")
    return eig_min, eig_max


class NoisyQuadratic(Task):
    """The noisy quadratic bowl of LODO (Liao, Dangovski, Foerster, Soljačić, "Learning to Optimize
    Quasi-Newton Methods", TMLR 2023, section 5.1).

    f_t(θ) = ½ (θ − c_t)ᵀ H (θ − c_t), H = Q diag(λ) Qᵀ with λ log-spaced in [eig_min, eig_max] and
    Q a random rotation (identity when ``rotate=False``). After every optimizer step the centre
    random-walks, c_{t+1} = c_t + noise·ξ_t with ξ_t ~ N(0, I) drawn from a generator seeded by
    (seed, t): the optimizer must keep tracking a moving optimum, and an ideal preconditioner is
    H⁻¹. The steady-state loss of a method measures how well it has learnt the curvature.

    Choices not fixed by the paper: c_0 = 0 and θ_0 ~ N(0, init_scale²·I) from the seed, so the
    first steps see a well-defined descent problem before the drift dominates. The training loss
    and the ``validation`` metric are both f at the current centre (there is no data).

    Attributes:
      hessian: H, (dim, dim), on the device.
      eigenvalues: λ, ascending.
      rotation: Q.
      centre: c_t (saved by :meth:`state_dict`).
    """

    splits = ("validation",)

    def __init__(
        self,
        dim: int = 100,
        eig_min: float = 1e-3,
        eig_max: float = 1.0,
        rotate: bool = True,
        noise: float = 1.0,
        init_scale: float = 1.0,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        super().__init__(seed=seed, device=device)
        self.dim = check_int("dim", dim)
        self.eig_min, self.eig_max = _check_spectrum(eig_min, eig_max)
        if not isinstance(rotate, bool):
            raise ValueError(f"rotate must be a bool, got {rotate!r}")
        self.rotate = rotate
        self.noise = check_float("noise", noise, nonnegative=True)
        self.init_scale = check_float("init_scale", init_scale, nonnegative=True)

        gen = generator(self.seed, "quadratic", "problem")
        lo, hi = math.log10(self.eig_min), math.log10(self.eig_max)
        lam = torch.logspace(lo, hi, self.dim, dtype=torch.float64)
        if rotate:
            q = random_rotation(self.dim, gen)
            h = (q * lam) @ q.T
            h = 0.5 * (h + h.T)  # exactly symmetric after rounding
        else:
            q, h = torch.eye(self.dim, dtype=torch.float64), torch.diag(lam)
        self.eigenvalues = lam.float().to(self.device)
        self.rotation = q.float().to(self.device)
        self.hessian = h.float().to(self.device)
        self.centre = torch.zeros(self.dim, device=self.device)
        theta0 = self.init_scale * torch.randn(self.dim, generator=generator(self.seed, "quadratic", "init"))
        self.model = ParameterVector(theta0).to(self.device)

    def _value(self) -> torch.Tensor:
        d = self.model() - self.centre
        return 0.5 * (d @ (self.hessian @ d))

    def batch(self, step: int) -> None:
        del step
        return None

    def loss(self, batch: None) -> torch.Tensor:
        del batch
        return self._value()

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        if split not in self.splits:
            raise ValueError(f"split must be one of {self.splits}, got {split!r}")
        return {"loss": self._value().item()}

    def advance(self, step: int) -> None:
        if self.noise == 0.0:
            return
        g = generator(self.seed, "drift", int(step), device=self.device)
        xi = torch.randn(self.dim, generator=g, device=self.device)
        self.centre.add_(xi, alpha=self.noise)

    def state_dict(self) -> dict[str, Any]:
        return {"centre": self.centre.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.centre.copy_(torch.as_tensor(state["centre"]).to(self.centre))


class Rosenbrock(Task):
    """f(x, y) = a_weight·(1 − x)² + b_weight·(y − x²)², minimum 0 at (1, 1).

    Rosenbrock, "An automatic method for finding the greatest or least value of a function",
    The Computer Journal, 1960. The classic form is (1, 100) from (−1.2, 1); LODO (Liao et al.,
    TMLR 2023) uses a_weight=0.01, b_weight=1 from (−0.5, 2). Deterministic: the seed is unused.
    """

    splits = ("validation",)

    def __init__(
        self,
        a_weight: float = 1.0,
        b_weight: float = 100.0,
        start: Sequence[float] = (-1.2, 1.0),
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        super().__init__(seed=seed, device=device)
        self.a_weight = check_float("a_weight", a_weight, nonnegative=True)
        self.b_weight = check_float("b_weight", b_weight, nonnegative=True)
        try:
            start = [float(v) for v in start]
        except (TypeError, ValueError):
            raise ValueError(f"start must be a pair of numbers [x, y], got {start!r}") from None
        if len(start) != 2 or not all(math.isfinite(v) for v in start):
            raise ValueError(f"start must be a pair of finite numbers [x, y], got {start!r}")
        self.start = tuple(start)
        self.model = ParameterVector(torch.tensor(start)).to(self.device)

    def _value(self) -> torch.Tensor:
        x, y = self.model()
        return self.a_weight * (1 - x) ** 2 + self.b_weight * (y - x**2) ** 2

    def batch(self, step: int) -> None:
        del step
        return None

    def loss(self, batch: None) -> torch.Tensor:
        del batch
        return self._value()

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        if split not in self.splits:
            raise ValueError(f"split must be one of {self.splits}, got {split!r}")
        return {"loss": self._value().item()}


class LinearRegression(SupervisedTask):
    """Random least squares, drawn per seed: the convex quadratic of learned-optimizer papers.

    Inputs x = V diag(√λ) z with z ~ N(0, I), λ log-uniform in [eig_min, eig_max] and V a random
    rotation, so E[x xᵀ] = V diag(λ) Vᵀ has a controlled spectrum (condition number ≤
    eig_max/eig_min). Targets y = w*ᵀx + noise·ε with w* ~ N(0, I). Loss ½·mean (wᵀx − y)², whose
    Hessian is the empirical input covariance. ``batch_size=None`` gives full-batch training, a
    deterministic quadratic as in Maheswaranathan et al., "Reverse engineering learned optimizers
    reveals known and novel mechanisms" (NeurIPS 2021). The model is a bias-free linear map with
    w_0 ~ N(0, init_scale²·I).

    Attributes:
      hessian: the training-loss Hessian (1/n) XᵀX, (dim, dim).
      eigenvalues: the population λ (unsorted).
      w_star: the generating weights.
    """

    is_classifier = False

    def __init__(
        self,
        dim: int = 20,
        n_train: int = 512,
        n_val: int = 256,
        n_test: int = 256,
        eig_min: float = 1e-3,
        eig_max: float = 1.0,
        noise: float = 0.1,
        batch_size: int | None = None,
        init_scale: float = 1.0,
        eval_batch_size: int = 4096,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        super().__init__(
            batch_size, seed=seed, device=device, eval_batch_size=eval_batch_size, allow_full_batch=True
        )
        self.dim = check_int("dim", dim)
        n_train = check_int("n_train", n_train)
        n_val = check_int("n_val", n_val)
        n_test = check_optional_int("n_test", n_test, minimum=0) or 0
        eig_min, eig_max = _check_spectrum(eig_min, eig_max)
        self.noise = check_float("noise", noise, nonnegative=True)
        init_scale = check_float("init_scale", init_scale, nonnegative=True)

        gen = generator(self.seed, "linreg", "data")
        u = torch.rand(self.dim, generator=gen, dtype=torch.float64)
        lam = torch.exp(math.log(eig_min) + u * (math.log(eig_max) - math.log(eig_min)))
        v = random_rotation(self.dim, gen)
        w_star = torch.randn(self.dim, generator=gen, dtype=torch.float64)
        n = n_train + n_val + n_test
        x = torch.randn(n, self.dim, generator=gen, dtype=torch.float64) @ (v * lam.sqrt()).T
        y = x @ w_star + self.noise * torch.randn(n, generator=gen, dtype=torch.float64)
        x, y = x.float(), y.float()
        self.set_data(
            train=(x[:n_train], y[:n_train]),
            validation=(x[n_train:n_train + n_val], y[n_train:n_train + n_val]),
            test=(x[n_train + n_val:], y[n_train + n_val:]) if n_test else None,
        )
        self.eigenvalues = lam.float().to(self.device)
        self.w_star = w_star.float().to(self.device)
        x_train = self.data["train"][0]
        self.hessian = x_train.T @ x_train / n_train

        with seeded_init(self.seed, "linreg", "init"):
            layer = nn.Linear(self.dim, 1, bias=False)
            nn.init.normal_(layer.weight, std=init_scale)
        self.model = layer.to(self.device)

    def criterion(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (output.squeeze(-1) - target).square().mean()
