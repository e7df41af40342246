"""Tests of metaopt.optim.lodo (Liao et al., "Learning to Optimize Quasi-Newton Methods", TMLR 2023).

The shared contract (tests/test_optim_contract.py) covers convergence on small problems,
state_dict round trips, argument checks and parameter groups for every registered variant; these
tests cover what is specific to LODO.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import metaopt.optim.lodo as lodo_module
from metaopt.optim import LODO, optimizer_state_bytes
from metaopt.optim.lodo import (
    diagonal_bilinear_grad,
    diagonal_precondition,
    hessian_approximation_error,
    hessian_approximation_errors,
    hidden_size,
    network_bilinear_grad,
    network_init,
    network_precondition,
)
from metaopt.tasks import NoisyQuadratic
from metaopt.train import train


def dense_preconditioner(blocks: torch.Tensor, perms: torch.Tensor, n: int) -> torch.Tensor:
    """Πᵀ AᵀA Π built from dense permutation and block-diagonal matrices: an independent reading
    of the layout (block j of a layer holds hidden coordinates j, nb + j, 2nb + j, ...).
    Differentiable in ``blocks``."""
    n_layers, k, _, nb = blocks.shape
    h = k * nb
    a = torch.eye(h, dtype=blocks.dtype)
    for layer in range(n_layers):
        p = torch.zeros(h, h, dtype=blocks.dtype)
        p[torch.arange(h), perms[layer].long()] = 1.0
        rows = []
        for c in range(h):
            i, j = divmod(c, nb)
            row = torch.zeros(h, dtype=blocks.dtype)
            row = row.index_put((torch.arange(k) * nb + j,), blocks[layer, i, :, j])
            rows.append(row)
        a = torch.stack(rows) @ p @ a
    pi = torch.eye(h, n, dtype=blocks.dtype)
    return pi.T @ a.T @ a @ pi


def random_network(n=7, n_layers=3, block_size=2, hidden_factor=2.0, seed=0):
    blocks, perms, inv = network_init(n, n_layers, block_size, hidden_factor,
                                      torch.Generator().manual_seed(seed))
    return blocks, perms, inv


@pytest.fixture(params=["bcast", "loop"])
def block_path(request, monkeypatch):
    """Run a test through both implementations of the block products."""
    monkeypatch.setattr(lodo_module, "_LOOP_ON_CPU", request.param == "loop")
    return request.param


# -- the preconditioner network ------------------------------------------------------------------


@pytest.mark.parametrize("n,block_size,hidden_factor", [(7, 2, 2.0), (10, 4, 2.0), (5, 3, 1.0),
                                                         (9, 1, 1.5)])
def test_network_starts_as_identity(n, block_size, hidden_factor):
    blocks, perms, inv = random_network(n, 4, block_size, hidden_factor)
    assert perms.shape[1] == hidden_size(n, block_size, hidden_factor)
    assert perms.shape[1] % block_size == 0 and perms.shape[1] >= hidden_factor * n
    g = network_precondition(blocks, perms, inv, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(g, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("lr", [1.0, 0.3])
def test_initial_step_map_is_exactly_lr_times_identity(lr):
    params = [torch.zeros(3, 2, requires_grad=True), torch.zeros(5, requires_grad=True)]
    opt = LODO(params, lr=lr, seed=1)
    m = opt.apply_preconditioner(torch.eye(11))
    torch.testing.assert_close(m, lr * torch.eye(11), rtol=0, atol=1e-6)


def test_network_is_symmetric_psd_and_matches_dense_construction(block_path):
    blocks, perms, inv = random_network(n=7, n_layers=3, block_size=2)
    blocks = torch.randn(blocks.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g = network_precondition(blocks, perms, inv, torch.eye(7, dtype=torch.float64))
    torch.testing.assert_close(g, g.T, rtol=0, atol=1e-12)
    assert torch.linalg.eigvalsh(g).min() > -1e-10
    torch.testing.assert_close(g, dense_preconditioner(blocks, perms, 7), rtol=1e-10, atol=1e-10)


def test_bilinear_grad_is_autograd_of_dense_form(block_path):
    blocks, perms, inv = random_network(n=6, n_layers=3, block_size=3)
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randn(blocks.shape, dtype=torch.float64, generator=gen)
    a, b = torch.randn(2, 6, dtype=torch.float64, generator=gen)
    phi = blocks.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(a @ dense_preconditioner(phi, perms, 6) @ b, phi)
    torch.testing.assert_close(network_bilinear_grad(blocks, perms, inv, a, b), expected)
    d = torch.randn(6, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(diagonal_precondition(d, a[None])[0], d * a)
    torch.testing.assert_close(diagonal_bilinear_grad(a, b), a * b)


def test_block_paths_agree_on_a_large_vector():
    blocks, perms, inv = random_network(n=3000, n_layers=2, block_size=4)
    gen = torch.Generator().manual_seed(4)
    blocks = torch.randn(blocks.shape, dtype=torch.float64, generator=gen)
    a, b = torch.randn(2, 3000, dtype=torch.float64, generator=gen)
    results = []
    for loop in (False, True):
        lodo_module._LOOP_ON_CPU, saved = loop, lodo_module._LOOP_ON_CPU
        try:
            results.append((network_precondition(blocks, perms, inv, a[None]),
                            network_bilinear_grad(blocks, perms, inv, a, b)))
        finally:
            lodo_module._LOOP_ON_CPU = saved
    for x, y in zip(*results):
        torch.testing.assert_close(x, y)


# -- the optimizer -------------------------------------------------------------------------------


def _quartic(params):
    x = torch.cat([p.reshape(-1) for p in params])
    w = torch.linspace(0.5, 2.0, x.numel(), dtype=x.dtype)
    return (w * (x - 0.3) ** 2).sum() + 0.1 * (x ** 4).sum() + x[0] * x[-1]


@pytest.mark.parametrize("preconditioner", ["network", "diagonal"])
def test_meta_gradient_is_autograd_gradient_of_post_step_loss(preconditioner):
    """With SGD as meta-optimizer, φ after the second step is φ₀ − η·∂ℓ(θ₁(φ))/∂φ at φ₀, where
    θ₁(φ) = θ₀ − D·G_φ(m₁) and the gradient is taken by autograd through a dense G. φ₀ is random
    (not the identity start), and two groups with different lr check the per-coordinate scale D."""
    torch.manual_seed(0)
    dt = torch.float64
    params = [torch.randn(2, 2, dtype=dt, requires_grad=True), torch.randn(3, dtype=dt, requires_grad=True)]
    theta0 = [p.detach().clone() for p in params]
    eta, lrs, beta = 0.05, (0.2, 0.1), 0.9
    opt = LODO([{"params": [params[0]], "lr": lrs[0]}, {"params": [params[1]], "lr": lrs[1]}],
               meta_lr=eta, beta=beta, n_layers=2, block_size=2, preconditioner=preconditioner,
               meta_optimizer="sgd", seed=5)
    opt.step()  # no gradients yet: builds the state and moves nothing

    # Restart from θ₀ with a random φ₀, as if the optimizer had been built with it.
    state = copy.deepcopy(opt.state_dict())
    phi0 = state["lodo"]["phi"] + 0.5 * torch.randn(state["lodo"]["phi"].shape, dtype=dt)
    state["lodo"].update(phi=phi0.clone(), prev_scales=None, num_steps=0,
                         momentum=torch.zeros(7, dtype=dt))
    opt.load_state_dict(state)
    with torch.no_grad():
        for p, p0 in zip(params, theta0):
            p.copy_(p0)

    def loss(flat):
        return _quartic([flat[:4].view(2, 2), flat[4:]])

    opt.zero_grad()
    loss(torch.cat([p.reshape(-1) for p in params])).backward()
    m1 = (1 - beta) * torch.cat([p.grad.reshape(-1) for p in params])
    opt.step()
    d = torch.tensor([lrs[0]] * 4 + [lrs[1]] * 3, dtype=dt)
    phi = phi0.clone().requires_grad_(True)
    if preconditioner == "network":
        move = -d * (dense_preconditioner(phi, state["lodo"]["perms"], 7) @ m1)
    else:
        move = -d * phi * m1
    theta1 = torch.cat([p.reshape(-1) for p in theta0]) + move
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in params]), theta1.detach())
    (expected,) = torch.autograd.grad(loss(theta1), phi)

    opt.zero_grad()
    loss(torch.cat([p.reshape(-1) for p in params])).backward()
    opt.step()
    torch.testing.assert_close(opt.state_dict()["lodo"]["phi"], phi0 - eta * expected)


def _trajectory(global_seed, steps=20, **kw):
    torch.manual_seed(global_seed)
    x = torch.randn(6, requires_grad=True)
    opt = LODO([x], lr=0.1, **kw)
    for _ in range(steps):
        opt.zero_grad()
        _quartic([x]).backward()
        opt.step()
    return x.detach().clone(), opt.state_dict()["lodo"]["perms"].clone()


def test_reproducible_under_a_seed():
    a, pa = _trajectory(3)
    b, pb = _trajectory(3)
    c, pc = _trajectory(4)
    assert torch.equal(a, b) and torch.equal(pa, pb)
    assert not torch.equal(pa, pc) and not torch.equal(a, c)
    d, pd = _trajectory(4, seed=7)
    e, pe = _trajectory(5, seed=7)
    assert torch.equal(pd, pe)  # an explicit seed fixes the network whatever the global state


def test_parameters_without_grad_do_not_move_and_groups_must_agree():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    opt = LODO([a, b], lr=0.1, seed=0)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        (a ** 2).sum().backward()
        opt.step()
    assert torch.equal(b.detach(), torch.ones(2))
    assert not torch.equal(a.detach(), torch.ones(3))
    with pytest.raises(ValueError, match="add parameter groups before"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    with pytest.raises(ValueError, match="beta"):
        LODO([{"params": [a], "beta": 0.5}, {"params": [b]}], seed=0)


def test_diagnostics_are_floats_and_memory_matches_the_docstring():
    x = torch.zeros(1000, requires_grad=True)
    opt = LODO([x], seed=0)
    assert math.isnan(opt.diagnostics()["step_norm"]) and opt.extra_state_bytes() == 0
    for _ in range(2):
        opt.zero_grad()
        ((x - 1) ** 2).sum().backward()
        opt.step()
    diag = opt.diagnostics()
    assert all(isinstance(v, float) and math.isfinite(v) for v in diag.values()), diag
    assert diag["num_steps"] == 2.0
    per_param = optimizer_state_bytes(opt) / x.numel()
    # 4·L·k·f·(1 + 2) + 8·L·f + 4 = 1796 bytes at the defaults (plus Adam's step counter).
    assert 1796 <= per_param < 1797
    small = LODO([x], n_layers=4, block_size=2, hidden_factor=1.0, seed=0)
    for _ in range(2):  # Adam's moments appear with the first meta-update, at the second step
        small.zero_grad()
        ((x - 1) ** 2).sum().backward()
        small.step()
    assert 132 <= optimizer_state_bytes(small) / x.numel() < 133
    diagonal = LODO([x], preconditioner="diagonal", seed=0)
    diagonal.step()
    diagonal.step()
    assert 16 <= optimizer_state_bytes(diagonal) / x.numel() < 17


# -- the Hessian-approximation error and the noisy quadratic bowl --------------------------------


def test_hessian_error_exact_and_estimated_agree():
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))[0]
    h = (q * torch.logspace(-2, 0, 30, dtype=torch.float64)) @ q.T
    p = torch.diag(torch.linspace(0.5, 2.0, 30, dtype=torch.float64))
    exact = torch.linalg.matrix_norm(torch.eye(30, dtype=torch.float64) - p @ h) / math.sqrt(30)
    value = hessian_approximation_error(lambda v: v @ p, lambda v: v @ h, 30, dtype=torch.float64)
    assert value == pytest.approx(float(exact), rel=1e-12)
    estimate = hessian_approximation_error(lambda v: v @ p, lambda v: v @ h, 30, probes=2000,
                                           generator=gen, dtype=torch.float64)
    assert estimate == pytest.approx(float(exact), rel=0.05)
    half = torch.linalg.matrix_norm(torch.eye(30, dtype=torch.float64) - 0.5 * p @ h) / math.sqrt(30)
    both = hessian_approximation_errors(lambda v: v @ p, lambda v: v @ h, 30, scales=(1.0, 0.5),
                                        dtype=torch.float64)
    assert both == pytest.approx([float(exact), float(half)], rel=1e-12)
    assert float(half) != pytest.approx(float(exact), rel=0.01)


def _noisy_quadratic_run(make, steps, **task_kwargs):
    """Mean loss over the second half, and :meth:`LODO.hessian_errors` before and after training
    (NaN for other optimizers)."""
    torch.manual_seed(0)
    task = NoisyQuadratic(seed=0, **task_kwargs)
    opt = make(task.model.parameters())
    h = task.hessian
    error = getattr(opt, "hessian_errors", lambda hvp: math.nan)
    start = error(lambda v: v @ h)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = task.loss(None)
        loss.backward()
        opt.step()
        task.advance(step)
        losses.append(loss.item())
    tail = losses[steps // 2:]
    return sum(tail) / len(tail), start, error(lambda v: v @ h)


def test_hessian_error_falls_on_the_noisy_quadratic_bowl():
    """The paper's 100-d bowl at the default β = 0.9: the learnt step map approaches
    (1 + β)·H⁻¹, the zero of the one-step hypergradient with momentum (see the LODO docstring),
    so ‖I − lr·G H/(1 + β)‖_F/√n falls while the paper's ‖I − lr·G H‖_F/√n heads for β = 0.9,
    above its start. Without momentum (β = 0) the two coincide and the paper's measure falls."""
    _, start, end = _noisy_quadratic_run(lambda p: LODO(p, seed=0), 1000)
    assert start["hessian_error"] == pytest.approx(0.883, abs=0.002)  # ‖I − H‖_F/√n: G = I
    assert start["hessian_error_momentum"] == pytest.approx(0.930, abs=0.002)  # ‖I − H/1.9‖
    assert end["hessian_error_momentum"] < start["hessian_error_momentum"] - 0.05, (start, end)
    assert 0.85 < end["hessian_error"] < 0.95, end  # not towards H⁻¹ but 1.9·H⁻¹: error → β
    _, start, end = _noisy_quadratic_run(lambda p: LODO(p, beta=0.0, seed=0), 400)
    assert start["hessian_error"] == start["hessian_error_momentum"]
    assert end["hessian_error"] < start["hessian_error"] - 0.03, (start, end)


@pytest.mark.parametrize("seed", [0, 1])
def test_learnt_preconditioner_tends_to_one_plus_beta_over_the_hessian(seed):
    """On an axis-aligned noisy bowl the diagonal ablation shows the fixed point per coordinate:
    lr·φ_i·λ_i settles near 1 without momentum and near 1 + β = 1.9 with β = 0.9."""
    for beta, target in ((0.0, 1.0), (0.9, 1.9)):
        torch.manual_seed(seed)
        task = NoisyQuadratic(dim=4, eig_min=0.5, rotate=False, seed=seed)
        opt = LODO(task.model.parameters(), beta=beta, meta_lr=1e-2, preconditioner="diagonal",
                   seed=seed)
        history = []
        for step in range(3000):
            opt.zero_grad()
            task.loss(None).backward()
            opt.step()
            task.advance(step)
            if step >= 2000:  # Adam keeps φ jittering by about meta_lr: average the last third
                history.append(opt.state_dict()["lodo"]["phi"].clone())
        q = torch.stack(history).mean(0) * task.eigenvalues
        assert torch.all((q - target).abs() < 0.2 * target), (beta, q)


def test_lodo_beats_untuned_sgd_on_the_noisy_quadratic_bowl():
    steps = 300
    lodo, _, _ = _noisy_quadratic_run(lambda p: LODO(p, seed=0), steps)
    sgd, _, _ = _noisy_quadratic_run(lambda p: torch.optim.SGD(p, lr=0.1), steps)  # conf/optimizer/sgd
    assert lodo < 0.5 * sgd, (lodo, sgd)


# -- the training loop -----------------------------------------------------------------------------


def test_hessian_callback_logs_and_leaves_the_trajectory_alone(make_cfg, tmp_path):
    base = ("task=quadratic", "optimizer=lodo", "trainer.steps=20", "trainer.log_every=10")
    train(make_cfg(*base), run_dir=tmp_path / "plain")
    train(make_cfg(*base, "analysis=lodo_hessian"), run_dir=tmp_path / "analysed")
    plain = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    analysed = [json.loads(line) for line in
                (tmp_path / "analysed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/loss"] for r in plain] == [r["train/loss"] for r in analysed]
    errors = [r["analysis/hessian_error"] for r in analysed if "analysis/hessian_error" in r]
    assert len(errors) == 2 and all(0 < e < 2 for e in errors)
    corrected = [r["analysis/hessian_error_momentum"] for r in analysed
                 if "analysis/hessian_error" in r]
    assert len(corrected) == 2 and corrected != errors  # β = 0.9: G H/1.9 differs from G H
    summary = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["optimizer_state_bytes_per_param"] > 1000
    assert all(f"opt/{k}" in plain[-1] for k in ("meta_grad_norm", "momentum_norm", "step_norm"))


def test_hessian_callback_estimates_from_hvps_and_skips_other_optimizers(make_cfg, tmp_path):
    cfg = make_cfg("task=two_moons", "optimizer=lodo", "analysis=lodo_hessian", "analysis.probes=4",
                   "trainer.steps=10", "trainer.log_every=5")
    train(cfg, run_dir=tmp_path / "hvp")
    records = [json.loads(line) for line in (tmp_path / "hvp" / "metrics.jsonl").read_text().splitlines()]
    errors = [r["analysis/hessian_error"] for r in records if "analysis/hessian_error" in r]
    assert len(errors) == 2 and all(math.isfinite(e) and e > 0 for e in errors)
    train(make_cfg("task=quadratic", "optimizer=adam", "analysis=lodo_hessian"), run_dir=tmp_path / "adam")
    records = (tmp_path / "adam" / "metrics.jsonl").read_text()
    assert "hessian_error" not in records


def test_hessian_callbacks_hvp_is_the_minibatch_losss_hessian(make_cfg):
    """The callback's Hessian-vector products against autograd's dense Hessian of the same minibatch
    loss (the test above only sees a positive finite error, which an identity HVP also gives)."""
    from torch.func import functional_call

    from metaopt.optim._lodo_analysis import LODOHessianError
    from metaopt.train import build

    torch.manual_seed(0)
    c = build(make_cfg("task=two_moons", "task.hidden=[6]", "optimizer=lodo"))
    batch = c.task.batch(0)
    params = [p for group in c.optimizer.param_groups for p in group["params"]]
    names = [name for name, _ in c.model.named_parameters()]
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params]).double()

    def loss_of(flat):
        chunks = torch.split(flat.float(), [s.numel() for s in shapes])
        weights = {n: t.reshape(s) for n, t, s in zip(names, chunks, shapes)}
        x, y = batch
        return c.task.criterion(functional_call(c.model, weights, (x,)), y).double()

    dense = torch.autograd.functional.hessian(loss_of, flat0)
    probes = torch.randn(3, flat0.numel(), generator=torch.Generator().manual_seed(1))
    hvps = LODOHessianError._loss_hvp(batch, c)(probes)
    torch.testing.assert_close(hvps.double(), probes.double() @ dense.T, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["lodo_noisy_quadratic", "lodo_rosenbrock"])
def test_experiments_compose_and_run_tiny(make_cfg, tmp_path, name):
    cfg = make_cfg(f"experiment={name}", "trainer.steps=20", "trainer.eval_every=10",
                   "trainer.log_every=10", "trainer.checkpoint_every=10")
    assert cfg.optimizer._target_ == "metaopt.optim.LODO"
    assert math.isfinite(train(cfg, run_dir=tmp_path / name))


def test_resnet_builds_and_steps_on_fake_cifar(make_cfg, tmp_path):
    from metaopt.data.cifar10 import write_fake_cifar10

    write_fake_cifar10(tmp_path / "cifar", n_train=60, n_test=10)
    cfg = make_cfg("experiment=lodo_resnet", f"task.data_dir={tmp_path / 'cifar'}", "task.depth=8",
                   "task.width=4",
                   "task.n_val=20", "task.batch_size=8", "task.eval_batch_size=20",
                   "trainer.steps=3", "trainer.eval_every=3", "trainer.log_every=3",
                   "trainer.checkpoint_every=3")
    train(cfg, run_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert 1796 <= summary["optimizer_state_bytes_per_param"] < 1797
