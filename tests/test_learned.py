"""Learned optimizers: the functional contract, the per-coordinate dynamics, hand-set initialisations,
per-run meta-parameters, the lopt.pt file and the drop-in ``torch.optim`` wrapper."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from metaopt.learned import (
    Learned,
    LearnedOptimizer,
    MLPOptimizer,
    RecurrentLearnedOptimizer,
    RNNOptimizer,
    load_lopt,
    save_lopt,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomise(lopt: LearnedOptimizer, scale: float = 0.3) -> LearnedOptimizer:
    """Every meta-parameter non-zero, so no part of the update is trivially absent."""
    with torch.no_grad():
        for p in lopt.parameters():
            p.add_(scale * torch.randn_like(p))
    return lopt


ARCHS = {
    "rnn_log_sign": lambda: RNNOptimizer(hidden_size=6),
    "rnn_scaled": lambda: RNNOptimizer(hidden_size=6, input_encoding="scaled", input_scale=2.0),
    "mlp": lambda: MLPOptimizer(hidden_sizes=[8, 8]),
}


@pytest.mark.parametrize("name", ARCHS)
def test_untrained_optimizer_is_idle(name):
    lopt = ARCHS[name]()
    theta, grad = torch.randn(3, 5), torch.randn(3, 5)
    phi = lopt.meta_params()
    state = lopt.init_state(phi, theta)
    for _ in range(3):
        delta, state = lopt.update(phi, state, theta, grad)
        assert torch.equal(delta, torch.zeros_like(delta))
    assert lopt.is_idle()


def test_recurrent_dynamics_are_plain_per_coordinate_functions():
    """The analysis tools' interface: cell(h, x) -> h_next, readout(h_next) -> update, on one coordinate."""
    lopt = randomise(RNNOptimizer(hidden_size=6))
    assert isinstance(lopt, RecurrentLearnedOptimizer)
    h0 = lopt.initial_state()
    assert h0.shape == (6,)
    x = lopt.encode(torch.tensor(0.3))
    assert x.shape == (2,)
    h1 = lopt.cell(h0, x)
    assert h1.shape == (6,)
    u = lopt.readout(h1)
    assert u.shape == ()
    # The batched update is exactly these functions applied to every coordinate.
    theta, grad = torch.zeros(2, 4), torch.randn(2, 4)
    phi = lopt.meta_params()
    state = lopt.init_state(phi, theta)
    delta, state = lopt.update(phi, state, theta, grad)
    for i in range(2):
        for j in range(4):
            h = lopt.cell(h0, lopt.encode(grad[i, j]))
            torch.testing.assert_close(state["h"][i, j], h)
            torch.testing.assert_close(delta[i, j], lopt.readout(h))
    # Jacobians for linearisation work through the plain functions.
    jac = torch.func.jacrev(lopt.cell)(h1.detach(), x)
    assert jac.shape == (6, 6)


@pytest.mark.parametrize("name", ARCHS)
def test_per_run_meta_parameters_equal_one_run_at_a_time(name):
    """ES/PES evaluate one φ per run in a batch: identical to running each φ alone."""
    lopt = randomise(ARCHS[name]())
    runs = 3
    phis = [{k: v.detach() + 0.1 * torch.randn_like(v) for k, v in lopt.meta_params().items()} for _ in range(runs)]
    batched = {k: torch.stack([p[k] for p in phis]) for k in phis[0]}
    theta, grads = torch.randn(runs, 7), [torch.randn(runs, 7) for _ in range(4)]
    state = lopt.init_state(batched, theta)
    singles = [lopt.init_state(p, theta[i:i + 1]) for i, p in enumerate(phis)]
    for g in grads:
        delta, state = lopt.update(batched, state, theta, g)
        for i, p in enumerate(phis):
            d, singles[i] = lopt.update(p, singles[i], theta[i:i + 1], g[i:i + 1])
            torch.testing.assert_close(delta[i:i + 1], d)
        theta = theta + delta


def test_momentum_init_is_clipped_heavy_ball():
    beta, clip, lr = 0.8, 0.5, 0.3
    lopt = RNNOptimizer(hidden_size=5, input_encoding="scaled", input_scale=3.0, init="momentum",
                        init_momentum=beta, init_clip=clip, init_lr=lr)
    phi = lopt.meta_params()
    theta = torch.zeros(1, 4)
    state = lopt.init_state(phi, theta)
    buf = torch.zeros(1, 4)
    for _ in range(6):
        g = torch.randn(1, 4)
        delta, state = lopt.update(phi, state, theta, g)
        buf = beta * buf + clip * torch.tanh(g / clip)
        torch.testing.assert_close(delta, -lr * buf)


def test_adam_init_matches_torch_adam():
    def loss_fn(p):
        return ((p[0] - 1) ** 2 * torch.arange(1.0, 7.0)).sum() + (p[1] ** 4).sum()

    init = [torch.randn(6), torch.randn(2, 3)]
    a = [t.clone().requires_grad_(True) for t in init]
    b = [t.clone().requires_grad_(True) for t in init]
    opt_a = Learned(a, lopt=MLPOptimizer(init="adam", step_mult=0.05))
    opt_b = torch.optim.Adam(b, lr=0.05)
    for _ in range(30):
        for opt, p in ((opt_a, a), (opt_b, b)):
            opt.zero_grad()
            loss_fn(p).backward()
            opt.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_lopt_file_round_trip_and_drop_in_loading(tmp_path):
    lopt = randomise(RNNOptimizer(hidden_size=4, output_scale=0.05))
    save_lopt(lopt, tmp_path / "lopt.pt", meta_step=3)
    loaded = load_lopt(tmp_path)  # a run directory works too
    assert type(loaded) is RNNOptimizer and loaded.config() == lopt.config()
    for (k, v), (k2, v2) in zip(lopt.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = torch.randn(5, requires_grad=True)
    opt = Learned([x], checkpoint=str(tmp_path))
    assert opt.lopt.config() == lopt.config()
    # The configured architecture must match the file's.
    Learned([x], lopt=RNNOptimizer(hidden_size=4, output_scale=0.05), checkpoint=tmp_path / "lopt.pt")
    with pytest.raises(ValueError, match="checkpoint"):
        Learned([x], lopt=RNNOptimizer(hidden_size=8), checkpoint=tmp_path / "lopt.pt")
    torch.save({"model": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a learned-optimizer file"):
        Learned([x], checkpoint=tmp_path / "checkpoint.pt")


def test_drop_in_state_is_split_by_parameter_and_matches_the_flat_run():
    """Several parameters (and groups) step exactly like one flat vector through the functional form."""
    lopt = randomise(MLPOptimizer(hidden_sizes=[8]), 0.1)
    init = [torch.randn(3, 2), torch.randn(4)]
    params = [t.clone().requires_grad_(True) for t in init]
    opt = Learned([{"params": [params[0]]}, {"params": [params[1]]}], lopt=lopt)
    flat = torch.cat([t.reshape(-1) for t in init]).unsqueeze(0)
    phi = lopt.meta_params()
    state = lopt.init_state(phi, flat)

    def loss_fn(v):
        return (v ** 2 * torch.arange(1.0, 11.0)).sum()

    for _ in range(5):
        opt.zero_grad()
        loss_fn(torch.cat([p.reshape(-1) for p in params])).backward()
        opt.step()
        g = torch.func.grad(loss_fn)(flat[0]).unsqueeze(0)
        with torch.no_grad():
            delta, state = lopt.update(phi, state, flat, g)
        flat = flat + delta
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in params]), flat[0])
    assert opt.state[params[0]]["m"].shape == (6, 3) and opt.state[params[1]]["v"].shape == (4,)
    assert float(opt.state[params[0]]["step"]) == 5.0
    assert set(opt.diagnostics()) == {"update_rms", "grad_rms", "effective_lr"}
    assert opt.extra_state_bytes() == sum(p.numel() * 4 for p in lopt.parameters())


def test_untrained_and_default_drop_ins_say_so(caplog):
    x = torch.zeros(3, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="metaopt"):
        Learned([x], lopt=RNNOptimizer())
    assert "zero readout" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metaopt"):
        opt = Learned([x])
    assert "hand-set" in caplog.text and opt.lopt.config()["init"] == "momentum"


@pytest.mark.parametrize("kwargs,pattern", [
    ({"hidden_size": 0}, "hidden_size"), ({"input_encoding": "raw"}, "input_encoding"),
    ({"output_scale": -1.0}, "output_scale"), ({"init": "adam"}, "init"),
    ({"init": "momentum"}, "input_encoding='scaled'"), ({"init_momentum": 1.0}, "init_momentum")])
def test_rnn_rejects_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        RNNOptimizer(**kwargs)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"hidden_sizes": []}, "hidden_sizes"), ({"decays": [1.0]}, "decays"), ({"rms_decay": -0.1}, "rms_decay"),
    ({"timescales": [0]}, "timescales"), ({"step_mult": 0}, "step_mult"), ({"init": "momentum"}, "init")])
def test_mlp_rejects_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MLPOptimizer(**kwargs)


def test_drop_in_deepcopy_and_state_dict_exclude_meta_parameters():
    x = torch.randn(4, requires_grad=True)
    opt = Learned([x], lopt=RNNOptimizer(hidden_size=4, input_encoding="scaled", init="momentum"))
    x.grad = torch.ones(4)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd["state"][0]) == {"h"} and sd["state"][0]["h"].shape == (4, 4)
    assert all(set(g) >= {"lr", "params"} and "lopt" not in g for g in sd["param_groups"])


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_drop_in_resumes_a_cpu_checkpoint_on_another_device(name):
    # "meta" stands in for CUDA (no GPU here): what matters is that the parameters live on a device
    # other than the CPU the checkpoint is read onto (train.py loads with map_location="cpu").
    # torch's load_state_dict leaves a state tensor keyed "step" (MLPOptimizer's counter) on the CPU.
    lopt = randomise(ARCHS[name]())
    x = torch.randn(5, requires_grad=True)
    opt = Learned([x], lopt=copy.deepcopy(lopt))
    for _ in range(2):
        x.grad = torch.randn(5)
        opt.step()
    y = x.detach().to("meta").requires_grad_()
    resumed = Learned([y], lopt=copy.deepcopy(lopt))
    resumed.load_state_dict(opt.state_dict())
    y.grad = torch.randn(5, device="meta")
    resumed.step()
    assert all(v.device.type == "meta" for v in resumed.state[y].values())
