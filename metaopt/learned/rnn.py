"""The component-wise GRU learned optimizer of Maheswaranathan et al. (NeurIPS 2021).

Maheswaranathan, Sussillo, Metz, Sun, Sohl-Dickstein, "Reverse engineering learned optimizers
reveals known and novel mechanisms", NeurIPS 2021 (arXiv 2011.02159), following the component-wise
RNN of Andrychowicz et al., "Learning to learn by gradient descent by gradient descent", NeurIPS 2016.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from metaopt.learned.base import Phi, RecurrentLearnedOptimizer, linear

ENCODINGS = ("log_sign", "scaled")
INITS = ("zero", "momentum")


class RNNOptimizer(RecurrentLearnedOptimizer):
    r"""One GRU cell shared by every parameter coordinate; coordinates are the batch axis.

    Per coordinate i at step t:

    .. code-block:: text

        x_t = [log(1 + s·|g_t|), sign g_t]       (input_encoding="log_sign", the paper's choice)
            or  s·g_t                             (input_encoding="scaled")
        h_t = GRU(h_{t-1}, x_t)                   (PyTorch's GRU equations; h_0 is learned)
        Δθ  = output_scale · (w·h_t + b)          (w, b zero at init: the untrained optimizer is idle)

    No momentum or RMS features are given: the network has to discover them.

    Args:
      hidden_size: GRU units (the paper: 256; small CPU budgets: 16–64).
      input_encoding: ``"log_sign"`` or ``"scaled"``.
      input_scale: s above.
      output_scale: multiplies the readout; sets the step size an O(1) readout produces.
      init: ``"zero"`` (the paper: random GRU, zero readout, zero h_0) or ``"momentum"``, a
        hand-set starting point: one unit computes h ← β·h + (1−β)·tanh(g/c) and the readout gives
        Δθ = −α·Σ_k β^k·c·tanh(g_{t−k}/c), i.e. heavy-ball momentum with learning rate α on a
        gradient softly clipped at c (other units stay random and do not reach the readout).
        Needs ``input_encoding="scaled"``.
      init_momentum: β of ``init="momentum"``.
      init_clip: c of ``init="momentum"``.
      init_lr: α of ``init="momentum"``.
      seed: seeds the random GRU weights (the global RNG is left untouched).

    Warning: departures from the paper's reference code: sizes default small for CPU, and
    ``init="momentum"`` exists for drop-in use before meta-training (the paper always starts idle).
    """

    def __init__(
        self,
        hidden_size: int = 32,
        input_encoding: str = "log_sign",
        input_scale: float = 1.0,
        output_scale: float = 0.1,
        init: str = "zero",
        init_momentum: float = 0.9,
        init_clip: float = 1.0,
        init_lr: float = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        if input_encoding not in ENCODINGS:
            raise ValueError(f"input_encoding must be one of {ENCODINGS}, got {input_encoding!r}")
        for name, value in (("input_scale", input_scale), ("output_scale", output_scale),
                            ("init_clip", init_clip), ("init_lr", init_lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not 0.0 <= init_momentum < 1.0:
            raise ValueError(f"init_momentum must be in [0, 1), got {init_momentum!r}")
        if init == "momentum" and input_encoding != "scaled":
            raise ValueError("init='momentum' needs input_encoding='scaled' (a sign input has no magnitude to "
                             "average)")
        self._config = dict(hidden_size=hidden_size, input_encoding=input_encoding,
                            input_scale=float(input_scale), output_scale=float(output_scale), init=init,
                            init_momentum=float(init_momentum), init_clip=float(init_clip),
                            init_lr=float(init_lr), seed=int(seed))
        self.hidden_size = h = hidden_size
        self.input_size = d = 2 if input_encoding == "log_sign" else 1
        self.input_encoding = input_encoding
        self.input_scale = float(input_scale)
        self.output_scale = float(output_scale)
        # Gate order as nn.GRUCell: reset, update, new.
        self.weight_ih = nn.Parameter(torch.empty(3 * h, d))
        self.weight_hh = nn.Parameter(torch.empty(3 * h, h))
        self.bias_ih = nn.Parameter(torch.empty(3 * h))
        self.bias_hh = nn.Parameter(torch.empty(3 * h))
        self.readout_weight = nn.Parameter(torch.zeros(1, h))
        self.readout_bias = nn.Parameter(torch.zeros(1))
        self.h0 = nn.Parameter(torch.zeros(h))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            bound = 1.0 / math.sqrt(h)  # nn.GRUCell's default
            for p in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh):
                nn.init.uniform_(p, -bound, bound)
        if init == "momentum":
            self._set_momentum(init_momentum, init_clip, init_lr)

    @torch.no_grad()
    def _set_momentum(self, beta: float, clip: float, lr: float) -> None:
        h = self.hidden_size
        reset, update, new = 0, h, 2 * h  # row of unit 0 in each gate block
        for row in (reset, update, new):
            self.weight_ih[row].zero_()
            self.weight_hh[row].zero_()
            self.bias_ih[row] = 0.0
            self.bias_hh[row] = 0.0
        # z = β (constant update gate); n = tanh(s·g·a) with a·s = 1/c; the reset gate multiplies
        # W_hn·h + b_hn = 0, so it has no effect.
        self.bias_ih[update] = math.log(beta / (1.0 - beta)) if beta > 0 else -30.0
        self.weight_ih[new, 0] = 1.0 / (clip * self.input_scale)
        # h = (1−β) Σ β^k tanh(g_k/c), so Δθ = −α·c/(1−β)·h = −α Σ β^k c·tanh(g_k/c).
        self.readout_weight.zero_()
        self.readout_weight[0, 0] = -lr * clip / ((1.0 - beta) * self.output_scale)
        self.readout_bias.zero_()
        self.h0.zero_()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._config.items())

    # -- the per-coordinate dynamics ---------------------------------------------------------

    def encode(self, g: Tensor) -> Tensor:
        if self.input_encoding == "scaled":
            return (self.input_scale * g).unsqueeze(-1)
        return torch.stack([torch.log1p(self.input_scale * g.abs()), torch.sign(g)], dim=-1)

    def _cell(self, phi: Phi, h: Tensor, x: Tensor) -> Tensor:
        gi = linear(x, phi["weight_ih"], phi["bias_ih"])
        gh = linear(h, phi["weight_hh"], phi["bias_hh"])
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return n + z * (h - n)  # = (1 − z)·n + z·h

    def _readout(self, phi: Phi, h: Tensor) -> Tensor:
        return self.output_scale * linear(h, phi["readout_weight"], phi["readout_bias"]).squeeze(-1)

    def _initial_state(self, phi: Phi) -> Tensor:
        return phi["h0"]

    def is_idle(self) -> bool:
        """True when the readout is zero, so every update is zero (an untrained optimizer)."""
        return bool((self.readout_weight == 0).all() and (self.readout_bias == 0).all())
