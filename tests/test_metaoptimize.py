"""Tests of metaopt.optim.metaoptimize (Sharifnassab, Salehkaleybar and Sutton, ICML 2025)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import metaopt.train as train_module
from metaopt.optim import MetaOptimize, MetaOptimizeFull, requires_closure
from metaopt.optim.metaoptimize import meta_update
from metaopt.train import train

# The exact-HVP paths use loss.backward(create_graph=True), as a user of variant="full" would.
pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


DATA = (torch.randn(32, 5, generator=torch.Generator().manual_seed(1)),
        torch.randn(32, 2, generator=torch.Generator().manual_seed(2)))


def train_steps(model, opt, steps, closure_style=False):
    x, y = DATA
    for t in range(steps):
        xb, yb = x[t % 4 * 8:(t % 4 + 1) * 8], y[t % 4 * 8:(t % 4 + 1) * 8]

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            return loss

        if closure_style:
            opt.step(closure)
        else:
            closure()
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


# ---- meta="fixed" is the base optimizer -------------------------------------------------------

TORCH_TWINS = [
    ("sgd", {}, lambda ps, fe: torch.optim.SGD(ps, lr=0.03, foreach=fe), 0.03),
    ("sgdm", {"momentum": 0.5}, lambda ps, fe: torch.optim.SGD(ps, lr=0.03, momentum=0.5, foreach=fe), 0.03),
    ("rmsprop", {"rho": 0.9, "eps": 1e-6},
     lambda ps, fe: torch.optim.RMSprop(ps, lr=3e-3, alpha=0.9, eps=1e-6, foreach=fe), 3e-3),
    ("adam", {}, lambda ps, fe: torch.optim.Adam(ps, lr=3e-3, foreach=fe), 3e-3),
    ("adam", {"weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6},
     lambda ps, fe: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6, foreach=fe), 3e-3),
]


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("base,kwargs,twin,lr", TORCH_TWINS, ids=[f"{b}-{len(k)}" for b, k, _, _ in TORCH_TWINS])
def test_fixed_meta_follows_torch_optim_bit_for_bit(base, kwargs, twin, lr, foreach):
    reference = train_steps(model := small_model(), twin(model.parameters(), foreach), 25)
    model = small_model()
    ours = train_steps(model, MetaOptimize(model.parameters(), base=base, meta="fixed", alpha0=lr,
                                           foreach=foreach, **kwargs), 25)
    for a, b in zip(reference, ours):
        assert torch.equal(a, b)


def test_fixed_meta_sgd_weight_decay_is_torch_sgd_up_to_rounding():
    # torch.optim.SGD adds λθ to the gradient: the same step as decoupled decay for plain SGD.
    reference = train_steps(model := small_model(), torch.optim.SGD(model.parameters(), lr=0.03, weight_decay=0.1), 25)
    model = small_model()
    ours = train_steps(model, MetaOptimize(model.parameters(), base="sgd", meta="fixed", alpha0=0.03,
                                           weight_decay=0.1), 25)
    for a, b in zip(reference, ours):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fixed_meta_lion_follows_the_lion_rule():
    lr, wd, (b1, b2) = 1e-3, 0.1, (0.9, 0.99)
    model = small_model()
    params = list(model.parameters())
    moments = [torch.zeros_like(p) for p in params]

    class Lion(torch.optim.Optimizer):  # the rule as Chen et al. (2023) state it, one line each
        def __init__(self, ps):
            super().__init__(ps, {})

        @torch.no_grad()
        def step(self):
            for p, m in zip(params, moments):
                p.mul_(1 - lr * wd).add_(torch.sign(b1 * m + (1 - b1) * p.grad), alpha=-lr)
                m.mul_(b2).add_(p.grad, alpha=1 - b2)

    reference = train_steps(model, Lion(params), 25)
    model = small_model()
    ours = train_steps(model, MetaOptimize(model.parameters(), base="lion", meta="fixed", alpha0=lr,
                                           weight_decay=wd), 25)
    for a, b in zip(reference, ours):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---- the trace and the meta-gradient ---------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("base", ["sgd", "sgdm", "rmsprop", "adam", "lion"])
@pytest.mark.parametrize("gamma", [0.9, 0.05], ids=["gamma0.9", "gamma0.05-folds"])
def test_hessian_free_trace_is_the_discounted_sum_of_steps(base, foreach, gamma):
    # γ = 0.05 drives the trace's scale below its floor within the run, so it is folded in.
    wd, alpha = 0.05, 1e-2
    model = small_model(torch.float64)
    opt = MetaOptimize(model.parameters(), base=base, meta="fixed", alpha0=alpha, gamma=gamma, weight_decay=wd,
                       foreach=foreach)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    x, y = DATA
    for _ in range(6):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        nn.functional.mse_loss(model(x.double()), y.double()).backward()
        opt.step()
        # h_{t+1} = γ(1 − αλ)h_t − (θ_t − θ_{t+1})
        expected = [gamma * (1 - alpha * wd) * h + (p.detach() - b)
                    for h, p, b in zip(expected, model.parameters(), before)]
    for h, p in zip(expected, model.parameters()):
        torch.testing.assert_close(opt.trace(p), h)


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_gradient_trace_term_is_the_authors_adamw_trace(foreach):
    """``trace_term="gradient"``: h ← γ(1 − αλ)h − α·g/(√v̂ + ε), no αλθ (MetaOptimize_AdamW_Lion_hg.py)."""
    wd, alpha, gamma, b2, eps = 0.05, 1e-2, 0.9, 0.999, 1e-8
    model = small_model(torch.float64)
    opt = MetaOptimize(model.parameters(), base="adam", meta="fixed", alpha0=alpha, gamma=gamma, weight_decay=wd,
                       trace_term="gradient", foreach=foreach)
    reference = small_model(torch.float64)
    twin = torch.optim.AdamW(reference.parameters(), lr=alpha, weight_decay=wd, foreach=foreach)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    v = [torch.zeros_like(p) for p in model.parameters()]
    x, y = DATA
    for t in range(1, 7):
        for m, o in ((model, opt), (reference, twin)):
            o.zero_grad()
            nn.functional.mse_loss(m(x.double()), y.double()).backward()
            o.step()
        for i, p in enumerate(model.parameters()):
            v[i] = b2 * v[i] + (1 - b2) * p.grad**2
            expected[i] = gamma * (1 - alpha * wd) * expected[i] - alpha * p.grad / ((v[i] / (1 - b2**t)).sqrt() + eps)
    for h, p, q in zip(expected, model.parameters(), reference.parameters()):
        torch.testing.assert_close(opt.trace(p), h)
        assert torch.equal(p, q)  # the base step is still AdamW's


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_meta_gradient_is_trace_dot_gradient_before_the_step(foreach):
    model = small_model(torch.float64)
    opt = MetaOptimize(model.parameters(), meta="fixed", alpha0=1e-2, foreach=foreach)
    x, y = DATA
    for _ in range(4):
        opt.zero_grad()
        nn.functional.mse_loss(model(x.double()), y.double()).backward()
        traces = [opt.trace(p) for p in model.parameters()]
        expected = sum(float((h * p.grad).sum()) for h, p in zip(traces, model.parameters()))
        opt.step()
        assert opt.diagnostics()["meta_grad"] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def quadratic_1d(a: float):
    return lambda x: 0.5 * a * (x**2).sum()


def heavy_ball_losses(a: float, theta0: float, betas: list[float], mu: float = 0.0) -> list[float]:
    """f(θ_t) for t = 0..len(betas) under b ← μb + aθ, θ ← θ − exp(β_t)·b (float64 python)."""
    theta, buf, losses = theta0, 0.0, []
    for beta in betas:
        losses.append(0.5 * a * theta * theta)
        buf = mu * buf + a * theta
        theta -= math.exp(beta) * buf
    losses.append(0.5 * a * theta * theta)
    return losses


def discounted_future_sensitivities(a, theta0, beta, steps, gamma, mu=0.0, delta=1e-6):
    """Σ_s ∂F_s/∂β_s by central differences, F_s = Σ_{t>s} γ^{t−1−s} f(θ_t), β_s alone perturbed."""
    total = 0.0
    for s in range(steps):
        values = []
        for sign in (1, -1):
            betas = [beta] * steps
            betas[s] += sign * delta
            losses = heavy_ball_losses(a, theta0, betas, mu)
            values.append(sum(gamma ** (t - 1 - s) * losses[t] for t in range(s + 1, steps + 1)))
        total += (values[0] - values[1]) / (2 * delta)
    return total


@pytest.mark.parametrize("alpha", [0.1, 0.7], ids=["too-small", "too-large"])
@pytest.mark.parametrize("gamma", [1.0, 0.8])
@pytest.mark.parametrize("hvp", ["exact", "difference"])
@pytest.mark.parametrize("base", ["sgd", "sgdm"])
def test_full_hypergradient_matches_finite_difference_of_discounted_future_loss(alpha, gamma, hvp, base):
    # 1-D quadratic f = ½aθ²; αa = 0.2 (step too small) or 1.4 (too large: SGD oscillates).
    a, theta0, steps = 2.0, 1.5, 12
    mu = 0.3 if base == "sgdm" else 0.0
    x = torch.tensor([theta0], dtype=torch.float64, requires_grad=True)
    extra = {"momentum": mu} if base == "sgdm" else {}
    opt = MetaOptimize([x], base=base, meta="fixed", alpha0=alpha, gamma=gamma, variant="full", **extra)
    f = quadratic_1d(a)
    z = []
    for _ in range(steps + 1):
        if hvp == "exact":
            opt.zero_grad()
            f(x).backward(create_graph=True)
            opt.step()
        else:
            def closure():
                opt.zero_grad()
                loss = f(x)
                loss.backward()
                return loss

            opt.step(closure)
        z.append(opt.diagnostics()["meta_grad"])
    # z_t = Σ_{s<t} γ^{t−1−s} ∂f(θ_t)/∂β_s, so Σ_{t=1..T} z_t = Σ_s ∂F_s/∂β_s.
    expected = discounted_future_sensitivities(a, theta0, math.log(alpha), steps, gamma, mu)
    tol = 1e-6 if hvp == "exact" else 1e-4
    assert sum(z[1:]) == pytest.approx(expected, rel=tol)
    if base == "sgd":
        assert math.copysign(1, expected) == (1 if alpha * a > 1 else -1)


@pytest.mark.parametrize("alpha", [0.1, 0.7], ids=["too-small", "too-large"])
def test_hessian_free_hypergradient_has_the_right_sign_on_a_1d_quadratic(alpha):
    a, theta0, steps, gamma = 2.0, 1.5, 12, 1.0
    x = torch.tensor([theta0], dtype=torch.float64, requires_grad=True)
    opt = MetaOptimize([x], base="sgd", meta="fixed", alpha0=alpha, gamma=gamma)
    z = []
    for _ in range(steps + 1):
        opt.zero_grad()
        quadratic_1d(a)(x).backward()
        opt.step()
        z.append(opt.diagnostics()["meta_grad"])
    expected = discounted_future_sensitivities(a, theta0, math.log(alpha), steps, gamma)
    assert math.copysign(1, sum(z[1:])) == math.copysign(1, expected)


@pytest.mark.parametrize("base,extra", [("sgdm", {"momentum": 0.7}), ("adam", {"betas": (0.8, 0.9)}),
                                        ("rmsprop", {"rho": 0.9})])
def test_full_trace_is_the_exact_derivative_of_theta(base, extra):
    # With one block and γ = 1 the full trace is dθ_T/dβ for a constant β: check it against a
    # central difference of whole trajectories on a 2-D quadratic (for Adam and RMSProp this
    # includes the derivatives of both moments through the preconditioner).
    hessian = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    theta0 = torch.tensor([1.0, -2.0], dtype=torch.float64)

    def run(alpha, steps=8):
        x = theta0.clone().requires_grad_(True)
        opt = MetaOptimize([x], base=base, meta="fixed", alpha0=alpha, gamma=1.0, variant="full",
                           weight_decay=0.1, **extra)
        for _ in range(steps):
            opt.zero_grad()
            (0.5 * x @ hessian @ x).backward(create_graph=True)
            opt.step()
        return x.detach(), opt.trace(x)

    beta, delta = math.log(0.05), 1e-6
    _, trace = run(math.exp(beta))
    plus, _ = run(math.exp(beta + delta))
    minus, _ = run(math.exp(beta - delta))
    torch.testing.assert_close(trace, (plus - minus) / (2 * delta), rtol=1e-6, atol=1e-9)


def test_meta_update_rules():
    # Lion moves β by exactly lr·sign; Adam and RMSProp move it by lr on their first step.
    beta, state = meta_update("lion", 0.0, 3.0, {}, lr=0.1, betas=(0.9, 0.99))
    assert beta == pytest.approx(-0.1) and state["meta_exp_avg"] == pytest.approx(0.03)
    assert meta_update("lion", 0.0, 0.0, {}, lr=0.1, betas=(0.9, 0.99))[0] == 0.0
    assert meta_update("adam", 1.0, -1e-9, {}, lr=0.1, betas=(0.9, 0.999), eps=1e-12)[0] == pytest.approx(1.1, rel=1e-3)
    assert meta_update("rmsprop", 1.0, 5.0, {}, lr=0.1, rho=0.999, eps=1e-12)[0] == pytest.approx(0.9)
    assert meta_update("fixed", 1.0, 5.0, {"x": 1}, lr=0.1) == (1.0, {"x": 1})
    state = {"meta_exp_avg": 1.0}
    meta_update("lion", 0.0, -5.0, state, lr=0.1, betas=(0.9, 0.99))
    assert state == {"meta_exp_avg": 1.0}  # the caller's state is not modified


def test_step_size_moves_up_when_too_small_and_down_when_too_large():
    # A deterministic quadratic (eigenvalues 1..10): SGD is stable below α = 0.2.
    scales = torch.linspace(1.0, 10.0, 10, dtype=torch.float64)
    for alpha0, direction in ((1e-3, 1), (0.19, -1)):
        x = torch.zeros(10, dtype=torch.float64, requires_grad=True)
        opt = MetaOptimize([x], base="sgd", alpha0=alpha0, meta_lr=1e-2, gamma=0.99)
        for _ in range(30):
            opt.zero_grad()
            (0.5 * (scales * (x - 1) ** 2).sum()).backward()
            opt.step()
        assert direction * (opt.alphas()[0] - alpha0) > 0


def test_nonfinite_meta_gradient_leaves_beta_unchanged():
    x = torch.ones(3, requires_grad=True)
    opt = MetaOptimize([x], alpha0=1e-2, meta_lr=0.1)
    for value in (1.0, float("inf")):
        x.grad = torch.full((3,), value)
        opt.step()
    diag = opt.diagnostics()
    assert diag["num_nonfinite_meta"] == 1 and diag["alpha"] == pytest.approx(1e-2)


# ---- blocks, groups, state -------------------------------------------------------------------


def test_layerwise_blocks_learn_one_step_size_per_tensor_and_round_trip():
    model = small_model()
    opt = MetaOptimize(model.parameters(), blocks="layerwise", alpha0=1e-2, meta_lr=0.05)
    train_steps(model, opt, 10)
    diag = opt.diagnostics()
    alphas = opt.alphas()
    assert len(alphas) == 4 and len(set(alphas)) > 1
    assert [diag[f"alpha/{i}"] for i in range(4)] == alphas
    assert diag["alpha_min"] == min(alphas) and diag["alpha"] == pytest.approx(math.exp(sum(map(math.log, alphas)) / 4))

    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    reference = train_steps(model, opt, 5)
    model2 = small_model()
    model2.load_state_dict(saved_model)
    opt2 = MetaOptimize(model2.parameters(), blocks="layerwise", alpha0=1e-2, meta_lr=0.05)
    opt2.load_state_dict(saved_opt)
    for a, b in zip(reference, train_steps(model2, opt2, 5)):
        assert torch.equal(a, b)
    assert opt2.alphas() == opt.alphas()


@pytest.mark.parametrize("blocks", ["scalar", "layerwise", [3, 1]])
def test_foreach_and_single_tensor_paths_agree_when_learning(blocks):
    # Two groups with different weight decay, so that buckets split within a block.
    runs = []
    for foreach in (False, True):
        model = small_model()
        w1, b1, w2, b2 = model.parameters()
        opt = MetaOptimize([{"params": [w1, b1, w2]}, {"params": [b2], "weight_decay": 0.1}], base="lion",
                           blocks=blocks, alpha0=1e-2, meta_lr=0.05, meta="adam", foreach=foreach)
        runs.append((train_steps(model, opt, 12), opt.alphas()))
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b)
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-5)


@pytest.mark.parametrize("base", ["sgd", "sgdm"])
def test_flat_path_agrees_with_per_tensor_path_across_missing_grads_and_reloads(base):
    """The flat SGD/SGDm path (traces and buffers as views of one tensor) is the per-tensor math.

    A tensor without a gradient for a while (its buffer starts late) and a state_dict reload
    into a new optimizer (new tensors, so the flat storage is rebuilt) must not change anything.
    """
    def run(foreach, meta):
        model = small_model()
        params = list(model.parameters())

        def make(ps):
            return MetaOptimize(ps, base=base, blocks=[3, 1], alpha0=1e-2, meta_lr=0.05, meta=meta,
                                weight_decay=0.01, foreach=foreach)

        opt = make(params)
        x, y = DATA
        for t in range(12):
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            if t < 3:
                params[0].grad = None  # the first tensor joins late
            if t == 6:
                saved = copy.deepcopy(opt.state_dict())
                opt = make(params)
                opt.load_state_dict(saved)
            opt.step()
        return [p.detach().clone() for p in params], [opt.trace(p) for p in params], opt.alphas()

    # With β fixed the parameters are bit for bit the same (the traces differ in rounding only:
    # the flat path folds the scales of a bucket's traces together when they differ).
    single, flat = run(False, "fixed"), run(None, "fixed")
    for a, b in zip(single[0], flat[0]):
        assert torch.equal(a, b)
    for a, b in zip(single[1], flat[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    # Learning: the meta-gradient is summed in another order (one dot per bucket), so rounding.
    single, flat = run(False, "adam"), run(None, "adam")
    for a, b in zip(single[0] + single[1], flat[0] + flat[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert single[2] == pytest.approx(flat[2], rel=1e-5)


def _dispatched_ops(opt, model) -> int:
    """Kernels (aten ops other than views) that one ``opt.step()`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func._schema.name.startswith(("aten::view", "aten::_unsafe_view", "aten::slice",
                                                 "aten::alias", "aten::detach")):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 5)
    for _ in range(2):  # the first steps allocate state
        opt.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    with Count():
        opt.step()
    return Count.n


@pytest.mark.parametrize("base", ["sgd", "sgdm"])
def test_low_complexity_sgd_step_is_a_fixed_number_of_kernels_per_block(base):
    """The Hessian-free SGD/SGDm step costs O(1) kernels per block, not O(1) per tensor.

    On a small model the base step is two or three kernels per tensor, so per-tensor meta work
    (a dot product, a trace update, a host read) dominated the overhead (issue 4: 16-24% over
    torch.optim.SGD(momentum) before the flat path). Counting kernels is the deterministic proxy;
    tests/test_metaoptimize.py::test_low_complexity_step_cost_on_the_mnist1d_mlp times it.
    """
    def model(depth):
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(5, 5) for _ in range(depth)])

    counts = {}
    for depth in (2, 8):
        m = model(depth)
        counts[depth] = _dispatched_ops(MetaOptimize(m.parameters(), base=base, momentum=0.9 if base == "sgdm" else None,
                                                     alpha0=1e-3), m)
    assert counts[8] == counts[2] and counts[2] <= 10, counts


@pytest.mark.slow
@pytest.mark.parametrize("name,base,twin", [
    ("sgdm", {"base": "sgdm", "momentum": 0.9}, lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9)),
    ("adam", {"base": "adam"}, lambda ps: torch.optim.Adam(ps, lr=1e-5)),
])
def test_low_complexity_step_cost_on_the_mnist1d_mlp(name, base, twin, step_cost_ratio):
    """Issue 4: a low-complexity MetaOptimize training step costs at most 15% more than its base's
    (``step_cost_ratio``: the benchmark script's MNIST-1D MLP, see tests/conftest.py)."""
    ratios = step_cost_ratio(twin, lambda ps: MetaOptimize(ps, alpha0=1e-5, **base), limit=1.15)
    assert ratios[-1] <= 1.15, (name, ratios)


def test_block_lists_and_groupwise_blocks():
    model = small_model()
    opt = MetaOptimize(model.parameters(), blocks=[2, 2], alpha0=1e-2, meta_lr=0.05)
    train_steps(model, opt, 5)
    assert len(opt.alphas()) == 2
    w1, b1, w2, b2 = small_model().parameters()
    opt = MetaOptimize([{"params": [w1, b1]}, {"params": [w2, b2], "alpha0": 1e-3, "weight_decay": 0.1}],
                       blocks="groupwise", alpha0=1e-2)
    assert opt.alphas() == [1e-2, 1e-3]
    with pytest.raises(ValueError, match="blocks"):
        MetaOptimize(small_model().parameters(), blocks=[1, 2])
    with pytest.raises(ValueError, match="alpha0"):
        MetaOptimize([{"params": [w1]}, {"params": [w2], "alpha0": 1e-3}], alpha0=1e-2)
    with pytest.raises(ValueError, match="gamma"):
        MetaOptimize([{"params": [w1]}, {"params": [w2], "gamma": 0.5}])


@pytest.mark.parametrize("bad,pattern", [
    ({"base": "sgd", "betas": (0.9, 0.99)}, "betas"),
    ({"base": "adam", "rho": 0.9}, "rho"),
    ({"base": "lion", "eps": 1e-8}, "eps"),
    ({"meta": "lion", "meta_eps": 1e-8}, "meta_eps"),
    ({"meta": "adam", "meta_betas": (0.9, 1.0)}, "meta_betas parameter at index 1"),
    ({"blocks": "rowwise"}, "blocks"),
    ({"blocks": [1, 0]}, "blocks"),
    ({"gamma": True}, "gamma"),
    ({"alpha0": float("nan")}, "alpha0"),
    ({"variant": "full", "base": "lion"}, "variant"),
    ({"variant": "full", "base": "adam", "trace_term": "gradient"}, "trace_term"),
    ({"variant": "full", "base": "sgd", "foreach": True}, "foreach"),
    ({"foreach": 1}, "foreach"),
    ({"trace_term": "momentum"}, "trace_term"),
    ({"trace_term": "gradient", "base": "sgdm"}, "trace_term"),
])
def test_options_the_chosen_optimizers_do_not_use_or_bad_values_are_rejected(bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        MetaOptimize([torch.zeros(2, requires_grad=True)], **bad)


def test_resolved_hyperparameters_are_in_the_param_groups():
    opt = MetaOptimize([torch.zeros(2, requires_grad=True)], base="lion", meta="adam", blocks=[1])
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.99) and group["meta_betas"] == (0.9, 0.999) and group["eps"] is None
    assert "lr" not in group


# ---- the full variant: closure, HVPs, random state --------------------------------------------


def test_full_variant_declares_and_needs_a_closure():
    x = torch.ones(3, requires_grad=True)
    opt = MetaOptimize([x], base="sgdm", variant="full")
    assert isinstance(opt, MetaOptimizeFull) and requires_closure(opt)
    assert not requires_closure(MetaOptimize([x]))
    (x**2).sum().backward()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    copy.deepcopy(opt)  # deepcopy/pickle rebuild the subclass without arguments


def test_difference_and_exact_hvps_agree_and_random_state_is_restored():
    # A quadratic loss with a random multiplicative factor consumed per evaluation: both closure
    # calls of a step must see the same draw, and the generator must end where one call leaves it.
    hessian = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)

    def make():
        x = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
        return x, MetaOptimize([x], base="sgdm", variant="full", alpha0=0.05, meta_lr=0.01, gamma=0.9)

    def loss_of(x):
        return (1 + 0.1 * torch.rand(())) * 0.5 * x @ hessian @ x

    x1, opt1 = make()
    torch.manual_seed(5)
    for _ in range(6):
        def closure():
            opt1.zero_grad()
            loss = loss_of(x1)
            loss.backward()
            return loss
        opt1.step(closure)
    after_difference = torch.rand(())

    x2, opt2 = make()
    torch.manual_seed(5)
    for _ in range(6):
        opt2.zero_grad()
        loss_of(x2).backward(create_graph=True)
        opt2.step()
    after_exact = torch.rand(())
    assert after_difference == after_exact
    torch.testing.assert_close(x1.detach(), x2.detach(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(opt1.state[x1]["momentum_trace"], opt2.state[x2]["momentum_trace"],
                               rtol=1e-5, atol=1e-8)


# ---- through the training loop ---------------------------------------------------------------


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", ["metaoptimize", "metaoptimize_sgdm", "metaoptimize_blockwise", "metaoptimize_full",
                                  "metaoptimize_full_adam"])
def test_every_config_trains_and_logs_its_step_sizes(make_cfg, tmp_path, name):
    train(make_cfg("task=two_moons", f"optimizer={name}"), run_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert summary["status"] == "completed"
    assert all("opt/alpha" in r and "opt/meta_grad" in r for r in records)
    assert abs(math.log(records[-1]["opt/alpha"] / 1e-3)) > 1e-3  # β moved (Lion: by 1e-3 per step)
    if name.startswith("metaoptimize_full"):
        # one extra forward and backward per step for the HVP, none on the first (h = 0)
        assert summary["passes"] == {"forward": 39, "backward": 39}
    if name == "metaoptimize_blockwise":
        assert "opt/alpha/5" in records[-1]


class Interrupt(Exception):
    pass


def test_interrupted_then_resumed_run_equals_uninterrupted(make_cfg, tmp_path, monkeypatch, resumed_from):
    overrides = ("task=mnist1d", "optimizer=metaoptimize", "trainer.steps=30", "trainer.checkpoint_every=10",
                 "trainer.log_every=3")
    train(make_cfg(*overrides), run_dir=tmp_path / "full")
    real_update = train_module.Progress.update

    def interrupt(self, step, metrics):
        real_update(self, step, metrics)
        if step >= 17:
            raise Interrupt

    monkeypatch.setattr(train_module.Progress, "update", interrupt)
    with pytest.raises(Interrupt):
        train(make_cfg(*overrides), run_dir=tmp_path / "cut")
    monkeypatch.setattr(train_module.Progress, "update", real_update)
    train(make_cfg(*overrides), run_dir=tmp_path / "cut")
    assert resumed_from() == [10]

    def strip(records):
        return [{k: v for k, v in r.items() if k != "time"} for r in records]

    assert strip(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "full" / "metrics.jsonl"))


# ---- the claim, on a small budget ------------------------------------------------------------


def _noisy_quadratic_run(make_opt, steps: int, create_graph: bool = False):
    """Adam-family optimizer on metaopt's noisy quadratic; (tail loss, tail α geometric mean)."""
    from metaopt.tasks import NoisyQuadratic

    task = NoisyQuadratic(seed=0)
    opt = make_opt(task.model.parameters())
    losses, log_alphas = [], []
    for t in range(steps):
        opt.zero_grad()
        loss = task.loss(None)
        loss.backward(create_graph=create_graph)
        opt.step()
        task.advance(t)
        if t >= 0.8 * steps:
            losses.append(loss.item())
            if isinstance(opt, MetaOptimize):
                log_alphas.append(math.log(opt.alphas()[0]))
    alpha = math.exp(sum(log_alphas) / len(log_alphas)) if log_alphas else math.nan
    return sum(losses) / len(losses), alpha


@pytest.mark.slow
def test_step_size_recovers_from_100x_too_small_and_too_large_on_the_noisy_quadratic():
    """From the best constant lr / 100 and × 100, α ends at least halfway there (in log), within
    4x of it, and the tail loss is within 30% of the best constant lr's.

    Not asserted, because it does not hold: within 10%. The Hessian-free trace settles α about
    2.7x below the best constant Adam lr on this moving target (authors' gradient trace; the
    step trace, 5x below), which costs 1.17-1.26x the best loss (issue 4's closing note).
    """
    steps = 3000
    grid = {lr: _noisy_quadratic_run(lambda ps, lr=lr: torch.optim.Adam(ps, lr=lr), steps)[0]
            for lr in (0.3, 1.0, 3.0, 10.0)}
    best = min(grid, key=grid.get)
    for alpha0 in (best / 100, best * 100):
        loss, alpha = _noisy_quadratic_run(
            lambda ps, a=alpha0: MetaOptimize(ps, alpha0=a, meta_lr=3e-3, trace_term="gradient"), steps)
        assert abs(math.log(alpha / best)) < min(0.5 * abs(math.log(alpha0 / best)), math.log(4)), (alpha0, alpha, best)
        assert loss < 1.3 * grid[best], (alpha0, loss, grid)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_full_adam_trace_recovers_the_best_lr_within_10pct_on_the_noisy_quadratic():
    """The issue's claim with the full trace (exact HVPs, both moments differentiated): from the
    best constant Adam lr / 100 and × 100, α ends within 4x of it and the tail loss within 10%.
    Here 4000 steps, seed 0: α 3.5 and 10.5 (the loss is flat from 3 to 10: 42.4 and 46.9),
    loss 0.99x. At 20k steps, seeds 0-2: α 2.6-3.9, loss 1.01-1.03x."""
    steps = 4000
    grid = {lr: _noisy_quadratic_run(lambda ps, lr=lr: torch.optim.Adam(ps, lr=lr), steps)[0]
            for lr in (1.0, 3.0, 10.0)}
    best = min(grid, key=grid.get)
    assert best == 3.0, grid
    for alpha0 in (best / 100, best * 100):
        loss, alpha = _noisy_quadratic_run(
            lambda ps, a=alpha0: MetaOptimize(ps, base="adam", variant="full", alpha0=a, meta_lr=3e-3),
            steps, create_graph=True)
        assert abs(math.log(alpha / best)) < math.log(4), (alpha0, alpha, best)
        assert loss < 1.10 * grid[best], (alpha0, loss, grid)


# ---- the experiments and the study script ----------------------------------------------------


@pytest.mark.parametrize("name,task", [("metaoptimize_mnist1d", "Mnist1D"), ("metaoptimize_quadratic", "NoisyQuadratic"),
                                       ("metaoptimize_resnet", "ResNetCIFAR10")])
def test_experiments_compose_as_sweeps_against_the_base_optimizers(name, task, data_dir):
    from hydra import compose, initialize_config_dir

    from metaopt.config import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={name}", f"paths.data_dir={data_dir}",
                                                       "logger=none"], return_hydra_config=True)
    assert cfg.task._target_.endswith(task) and cfg.optimizer._target_ == "metaopt.optim.MetaOptimize"
    assert "metaoptimize" in cfg.hydra.sweeper.params["optimizer"].split(",")


@pytest.mark.parametrize("name", ["metaoptimize_mnist1d", "metaoptimize_quadratic"])
def test_experiments_run_tiny(make_cfg, tmp_path, name):
    train(make_cfg(f"experiment={name}", "trainer.eval_every=10"), run_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 20


@pytest.mark.slow
@pytest.mark.parametrize("base,plain,state_bytes", [("adam", "torch.optim.Adam", (8.0, 12.0)),
                                                    ("sgdm", "torch.optim.SGD", (4.0, 8.0))])
def test_study_script_writes_results_and_plot(tmp_path, data_dir, base, plain, state_bytes):
    from metaopt.experiments.metaoptimize_study import main

    main(["--task", "quadratic", "--base", base, "--out", str(tmp_path), "--lrs", "0.3", "1", "--seeds", "0",
          "--schedules", "constant", "--data-dir", data_dir, "--set", "trainer.steps=40", "trainer.log_every=10"])
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["base"] == base and result["best_fixed_lr"] in (0.3, 1.0)
    assert set(result["metaoptimize"]) == {"low", "high", "default"}
    assert result["metaoptimize"]["low"]["alpha0"] == pytest.approx(result["best_fixed_lr"] / 100)
    assert (tmp_path / "alpha.png").stat().st_size > 0
    # every run used the base asked for: the grid the plain optimizer, the starts MetaOptimize around
    # it (its state is the base's plus one trace per parameter: 4 bytes)
    for run in result["runs"]:
        summary = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
        grid = run["kind"] == "grid"
        assert summary["optimizer"] == (plain if grid else "metaopt.optim.MetaOptimize")
        assert summary["optimizer_state_bytes_per_param"] == pytest.approx(state_bytes[not grid], abs=0.1)


@pytest.mark.parametrize("base,per_param", [("sgd", 4.0), ("sgdm", 8.0), ("adam", 12.0)])
def test_state_bytes_count_flat_buffers_whole(base, per_param):
    """Trace (+ momentum, + Adam's two moments) per parameter, also when they are views of one flat buffer."""
    from metaopt.optim import optimizer_state_bytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))
    opt = MetaOptimize(model.parameters(), base=base, alpha0=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 40)).sum().backward()
        opt.step()
    n = sum(p.numel() for p in model.parameters())
    assert optimizer_state_bytes(opt) / n == pytest.approx(per_param, abs=0.1)


def test_float16_parameters_are_refused_with_the_alternatives():
    """The trace's scaled storage overflows float16 silently (β then stops learning): refused up front."""
    with pytest.raises(ValueError, match="float16 is not supported.*autocast.*bfloat16"):
        MetaOptimize([torch.zeros(3, dtype=torch.float16, requires_grad=True)])
    opt = MetaOptimize([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="float16"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.float16, requires_grad=True)]})
    assert len(opt.param_groups) == 1
    MetaOptimize([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)])  # bfloat16 has float32's range


def test_diagnostics_survive_a_step_size_that_underflows_to_zero():
    """β below −745 makes exp(β) exactly 0.0; diagnostics report the stored β instead of log(0)."""
    p = torch.ones(3, requires_grad=True)
    opt = MetaOptimize([p], base="sgd", meta="lion")
    p.grad = torch.ones(3)
    opt.step()
    opt.state[p]["beta"], opt.state[p]["alpha"] = -1000.0, math.exp(-1000.0)
    d = opt.diagnostics()
    assert d["beta"] == -1000.0 and d["alpha"] == 0.0
