"""A per-parameter MLP learned optimizer on hand-built features.

The design of the small MLP optimizers of learned_optimization: Metz, Freeman, Harrison,
Maheswaranathan, Sohl-Dickstein, "Practical tradeoffs between memory, compute, and performance in
learned optimizers", CoLLAs 2022 (arXiv 2203.11860), section 3 (features, second-moment
normalisation, the direction × exp(magnitude) output).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metaopt.learned.base import LearnedOptimizer, Phi, State, linear

INITS = ("zero", "adam")
_EPS = 1e-8


class MLPOptimizer(LearnedOptimizer):
    r"""An MLP applied to every coordinate, fed with momentum/RMS features it does not have to learn.

    Features of coordinate i at step t (t counts steps taken, from 1):

    .. code-block:: text

        raw      g, θ, m̂_k (k over ``decays``), √v̂                 m̂, v̂: bias-corrected EMAs of g, g²
                 each divided by its root mean square over the run's coordinates
        ratios   m̂_k / (√v̂ + ε)                                    (already scale-free: Adam's step)
        time     tanh(t / τ_j) (j over ``timescales``)              (the same for every coordinate)
        [d, m] = MLP(features)
        Δθ = step_mult · d · exp(exp_mult · m)

    Args:
      hidden_sizes: widths of the ReLU hidden layers.
      decays: momentum EMA decays (learned_optimization: 0.9, 0.99, 0.999).
      rms_decay: decay of the second-moment EMA v.
      timescales: τ_j of the step embedding.
      step_mult, exp_mult: output scales (learned_optimization uses 1e-3 for both, for neural
        networks; the defaults here suit the small synthetic tasks too).
      init: ``"zero"`` (output layer zero: the untrained optimizer is idle) or ``"adam"``, a
        hand-set starting point whose update is exactly Adam with learning rate ``step_mult`` and
        β1 = ``decays[0]``, β2 = ``rms_decay`` (two ReLU units carry the first ratio feature to
        the direction output; the other units stay random and do not reach the output).
      seed: seeds the random weights (the global RNG is left untouched).

    Warning: the second-moment normalisation spans all coordinates of one run (one task's flat
    parameter vector, or every parameter of a :class:`metaopt.learned.Learned` optimizer), not
    each tensor separately as in learned_optimization.
    """

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (32, 32),
        decays: Sequence[float] = (0.9, 0.99, 0.999),
        rms_decay: float = 0.999,
        timescales: Sequence[float] = (1, 3, 10, 30, 100, 300, 1000),
        step_mult: float = 0.01,
        exp_mult: float = 1.0,
        init: str = "zero",
        seed: int = 0,
    ):
        super().__init__()
        hidden_sizes = [int(h) for h in hidden_sizes]
        if not hidden_sizes or any(h < 2 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes must be a non-empty list of integers >= 2, got {hidden_sizes!r}")
        decays = [float(b) for b in decays]
        if not decays or not all(0.0 <= b < 1.0 for b in decays):
            raise ValueError(f"decays must be a non-empty list of numbers in [0, 1), got {decays!r}")
        if not 0.0 <= rms_decay < 1.0:
            raise ValueError(f"rms_decay must be in [0, 1), got {rms_decay!r}")
        timescales = [float(s) for s in timescales]
        if any(s <= 0 for s in timescales):
            raise ValueError(f"timescales must be positive, got {timescales!r}")
        for name, value in (("step_mult", step_mult), ("exp_mult", exp_mult)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self._config = dict(hidden_sizes=hidden_sizes, decays=decays, rms_decay=float(rms_decay),
                            timescales=timescales, step_mult=float(step_mult), exp_mult=float(exp_mult),
                            init=init, seed=int(seed))
        self.decays = decays
        self.rms_decay = float(rms_decay)
        self.step_mult, self.exp_mult = float(step_mult), float(exp_mult)
        self.register_buffer("timescales", torch.tensor(timescales), persistent=False)
        k = len(decays)
        self.num_raw = 3 + k  # g, θ, m̂_1..k, √v̂
        self.num_features = self.num_raw + k + len(timescales)
        widths = [self.num_features, *hidden_sizes, 2]
        self.num_layers = len(widths) - 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
                layer = nn.Linear(a, b)
                if i == self.num_layers - 1:
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)
                self.register_parameter(f"w{i}", layer.weight)
                self.register_parameter(f"b{i}", layer.bias)
        if init == "adam":
            self._set_adam()

    @torch.no_grad()
    def _set_adam(self) -> None:
        ratio = self.num_raw  # first ratio feature: m̂_1 / (√v̂ + ε)
        w0, b0 = self.w0, self.b0
        w0[:2].zero_()
        b0[:2].zero_()
        w0[0, ratio], w0[1, ratio] = 1.0, -1.0  # relu(r), relu(−r)
        for i in range(1, self.num_layers - 1):
            w, b = getattr(self, f"w{i}"), getattr(self, f"b{i}")
            w[:2].zero_()
            b[:2].zero_()
            w[0, 0], w[1, 1] = 1.0, 1.0
        last = getattr(self, f"w{self.num_layers - 1}")
        last.zero_()
        last[0, 0], last[0, 1] = -1.0, 1.0  # d = −(relu(r) − relu(−r)) = −r; magnitude 0

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._config.items())

    def is_idle(self) -> bool:
        last = self.num_layers - 1
        return bool((getattr(self, f"w{last}")[0] == 0).all() and (getattr(self, f"b{last}")[0] == 0).all())

    def init_state(self, phi: Phi, theta: Tensor) -> State:
        del phi
        p, n = theta.shape
        return {"m": theta.new_zeros(p, n, len(self.decays)), "v": theta.new_zeros(p, n),
                "step": theta.new_zeros(p)}

    def features(self, state: State, theta: Tensor, grad: Tensor) -> Tensor:
        """The ``[P, n, num_features]`` inputs of the MLP for the state after this step's EMAs."""
        betas = torch.tensor(self.decays, dtype=grad.dtype, device=grad.device)
        t = state["step"].unsqueeze(-1)  # [P, 1]
        m_hat = state["m"] / (1 - betas ** t.unsqueeze(-1))
        v_hat = state["v"] / (1 - self.rms_decay ** t)
        rms = v_hat.sqrt()
        raw = torch.cat([grad.unsqueeze(-1), theta.unsqueeze(-1), m_hat, rms.unsqueeze(-1)], dim=-1)
        # Second-moment normalisation over the run's coordinates (dim 1) makes the network see
        # O(1) inputs whatever the scale of the problem.
        raw = raw * torch.rsqrt(raw.square().mean(dim=1, keepdim=True) + 1e-12)
        ratios = m_hat / (rms.unsqueeze(-1) + _EPS)
        time = torch.tanh(t.unsqueeze(-1) / self.timescales.to(grad))  # [P, 1, τ]
        time = time.expand(-1, grad.shape[1], -1)
        return torch.cat([raw, ratios, time], dim=-1)

    def update(self, phi: Phi, state: State, theta: Tensor, grad: Tensor) -> tuple[Tensor, State]:
        betas = torch.tensor(self.decays, dtype=grad.dtype, device=grad.device)
        m = state["m"] * betas + grad.unsqueeze(-1) * (1 - betas)
        v = state["v"] * self.rms_decay + grad.square() * (1 - self.rms_decay)
        new = {"m": m, "v": v, "step": state["step"] + 1}
        x = self.features(new, theta, grad)
        for i in range(self.num_layers):
            x = linear(x, phi[f"w{i}"], phi[f"b{i}"])
            if i < self.num_layers - 1:
                x = F.relu(x)
        direction, magnitude = x.unbind(-1)
        return self.step_mult * direction * torch.exp(self.exp_mult * magnitude), new
