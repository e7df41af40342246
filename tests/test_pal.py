"""Tests of metaopt.optim.pal (Mutschler and Zell, NeurIPS 2020)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from metaopt.nn_utils import frozen_running_stats
from metaopt.optim.pal import PAL, pal_curvature, pal_step_size
from metaopt.optim.registry import requires_closure


def scalar_closure(opt, param, fn):
    """Closure for a loss ``fn(param)`` of one tensor; skips backward when grad is disabled."""

    def closure():
        if not torch.is_grad_enabled():
            return fn(param)
        opt.zero_grad()
        loss = fn(param)
        loss.backward()
        return loss

    return closure


class Counter:
    def __init__(self):
        self.forwards = 0
        self.backwards = 0


def model_closure(opt, model, x, y, style="skip", counter=None, record=None):
    """Training-loop closure on a fixed batch.

    ``style="skip"`` is the documented pattern (no backward and frozen BatchNorm statistics when
    grad is disabled); ``style="always"`` is LBFGS-style and calls backward every time.
    """

    def forward():
        if counter is not None:
            counter.forwards += 1
        if record is not None:
            record.append(torch.rand(()).item())
        return nn.functional.mse_loss(model(x), y)

    def closure():
        if style == "skip" and not torch.is_grad_enabled():
            with frozen_running_stats(model):
                return forward()
        opt.zero_grad()
        loss = forward()
        loss.backward()
        if counter is not None:
            counter.backwards += 1
        return loss

    return closure


def make_mlp(seed=0, dropout=0.0, batchnorm=False, width=16):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, width)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(width, 1)]
    model = nn.Sequential(*layers)
    x = torch.randn(32, 4)
    y = torch.randn(32, 1)
    return model, x, y


def params_snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def run_trajectory(model, opt, x, y, steps, style="skip"):
    closure = model_closure(opt, model, x, y, style=style)
    out = []
    for _ in range(steps):
        loss = opt.step(closure)
        out.append((loss.item(), params_snapshot(model), opt.diagnostics()["case"]))
    return out


def assert_same_trajectory(a, b):
    assert len(a) == len(b)
    for (la, pa, ca), (lb, pb, cb) in zip(a, b):
        assert la == lb and ca == cb
        for ta, tb in zip(pa, pb):
            assert torch.equal(ta, tb)


# --- the three branches of the line search ---------------------------------------------------


def test_parabola_one_step_lands_on_minimum():
    theta = nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    opt = PAL([theta], update_factor=1.0, direction_decay=0.0)
    closure = scalar_closure(opt, theta, lambda t: 1.5 * ((t - 0.5) ** 2).sum() + 3.0)
    loss = opt.step(closure)
    assert loss.item() == pytest.approx(1.5 * 1.5**2 + 3.0)
    assert theta.item() == pytest.approx(0.5, abs=1e-6)
    diag = opt.diagnostics()
    assert diag["case"] == "parabola"
    assert diag["curvature"] == pytest.approx(1.5)
    assert diag["slope"] == pytest.approx(-4.5)
    assert diag["step"] == pytest.approx(1.5)
    # ‖d‖ = |g| = 4.5, so SGD would need lr = s/‖d‖ for the same move.
    assert diag["lr_eff"] == pytest.approx(1.5 / 4.5)
    assert diag["num_parabola"] == 1 and diag["num_steps"] == 1


@pytest.mark.parametrize("update_factor,measuring_step", [(0.5, 1.0), (1.6, 0.3)])
def test_parabola_step_is_the_update_factor_times_the_minimum(update_factor, measuring_step):
    """From 2, the parabola 1.5(t − 0.5)² + 3 has its minimum 1.5 away: the step is update_factor × 1.5,
    whatever the measuring step (the loss is exactly a parabola)."""
    theta = nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    opt = PAL([theta], update_factor=update_factor, measuring_step=measuring_step, direction_decay=0.0,
              max_step=10.0)
    opt.step(scalar_closure(opt, theta, lambda t: 1.5 * ((t - 0.5) ** 2).sum() + 3.0))
    assert theta.item() == pytest.approx(2.0 - update_factor * 1.5, abs=1e-9)
    assert opt.diagnostics()["step"] == pytest.approx(update_factor * 1.5)


def test_parabola_step_is_capped_by_max_step():
    theta = nn.Parameter(torch.tensor([10.0], dtype=torch.float64))
    opt = PAL([theta], update_factor=1.0, direction_decay=0.0, max_step=2.0)
    opt.step(scalar_closure(opt, theta, lambda t: (t**2).sum()))
    assert theta.item() == pytest.approx(8.0)
    assert opt.diagnostics()["case"] == "parabola"


def test_concave_moves_to_measuring_point():
    theta = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = PAL([theta], measuring_step=0.5, direction_decay=0.0)
    opt.step(scalar_closure(opt, theta, lambda t: -(t**2).sum()))
    assert theta.item() == 1.5
    diag = opt.diagnostics()
    assert diag["case"] == "measuring_point" and diag["step"] == 0.5
    assert diag["curvature"] <= 0


def test_uphill_direction_gives_no_move():
    # Step 1 on a linear loss fills the direction buffer with g1 = +10; step 2 on a loss whose
    # gradient is -2 gives d = 0.4*10 - 2 = 2 > 0, so u = -1 points uphill: b = g·u = +2.
    theta = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    opt = PAL([theta], direction_decay=0.4)
    opt.step(scalar_closure(opt, theta, lambda t: 10.0 * t.sum()))
    assert opt.diagnostics()["case"] == "measuring_point"
    before = theta.detach().clone()
    buffer_before = opt.state[theta]["direction_buffer"].clone()
    opt.step(scalar_closure(opt, theta, lambda t: (t**2).sum()))
    diag = opt.diagnostics()
    assert diag["case"] == "no_descent" and diag["step"] == 0.0
    assert diag["slope"] == pytest.approx(2.0)
    assert torch.equal(theta.detach(), before)
    # The direction update is part of the step even though the step length is zero.
    assert torch.equal(opt.state[theta]["direction_buffer"], 0.4 * buffer_before - 2.0)


def test_cheap_slope_always_descends():
    theta = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    opt = PAL([theta], direction_decay=0.4, exact_slope=False)
    opt.step(scalar_closure(opt, theta, lambda t: 10.0 * t.sum()))
    opt.step(scalar_closure(opt, theta, lambda t: (t**2).sum()))
    diag = opt.diagnostics()
    assert diag["slope"] == pytest.approx(-2.0)
    assert diag["case"] != "no_descent"


def test_zero_gradient_is_no_descent_with_one_forward():
    theta = nn.Parameter(torch.tensor([0.0]))
    opt = PAL([theta])
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (theta**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert calls == [True]
    assert theta.item() == 0.0 and opt.diagnostics()["case"] == "no_descent"


@pytest.mark.parametrize(
    "l0, l_mu, b, expected",
    [
        (1.0, 0.5, -1.0, "parabola"),
        (1.0, -5.0, -1.0, "measuring_point"),
        (1.0, 0.5, 0.0, "no_descent"),
        (1.0, float("nan"), -1.0, "nonfinite"),
        (float("inf"), 0.5, -1.0, "nonfinite"),
        (1.0, 0.5, float("-inf"), "nonfinite"),
    ],
)
def test_step_size_function_cases(l0, l_mu, b, expected):
    s, case = pal_step_size(l0, l_mu, b, mu=1.0, update_factor=1.0, max_step=10.0)
    assert case == expected
    if expected == "parabola":
        a = pal_curvature(l0, l_mu, b, 1.0)
        assert s == pytest.approx(-b / (2 * a))
    elif expected == "measuring_point":
        assert s == 1.0
    else:
        assert s == 0.0


def test_step_size_is_capped_in_both_descent_cases():
    assert pal_step_size(1.0, 0.01, -1.0, 1.0, 1.0, 3.16) == (3.16, "parabola")
    assert pal_step_size(1.0, -5.0, -1.0, 4.0, 1.0, 3.16) == (3.16, "measuring_point")


# --- parameter groups ------------------------------------------------------------------------


def test_two_groups_same_trajectory_as_one():
    model_a, x, y = make_mlp(seed=1)
    model_b = copy.deepcopy(model_a)
    opt_a = PAL(model_a.parameters())
    layers = list(model_b.children())
    opt_b = PAL([{"params": layers[0].parameters()}, {"params": layers[3].parameters()}])
    assert_same_trajectory(run_trajectory(model_a, opt_a, x, y, 5),
                           run_trajectory(model_b, opt_b, x, y, 5))


def test_second_group_is_optimised():
    model, x, y = make_mlp(seed=2)
    layers = list(model.children())
    opt = PAL([{"params": layers[0].parameters()}, {"params": layers[3].parameters()}])
    last = layers[3].weight.detach().clone()
    run_trajectory(model, opt, x, y, 2)
    assert not torch.equal(layers[3].weight.detach(), last)


def test_groups_with_different_hyperparameters_raise():
    model, _, _ = make_mlp()
    layers = list(model.children())
    with pytest.raises(ValueError, match="measuring_step"):
        PAL([{"params": layers[0].parameters()},
             {"params": layers[3].parameters(), "measuring_step": 0.5}])
    opt = PAL(layers[0].parameters())
    with pytest.raises(ValueError, match="direction_decay"):
        opt.add_param_group({"params": layers[3].parameters(), "direction_decay": 0.0})


# --- random state, BatchNorm, closure protocol ------------------------------------------------


def test_dropout_mask_identical_in_both_forwards():
    model, x, y = make_mlp(seed=3, dropout=0.5)
    opt = PAL(model.parameters())
    masks, draws = [], []
    model[2].register_forward_hook(lambda mod, inp, out: masks.append(out != 0))
    closure = model_closure(opt, model, x, y, record=draws)
    for _ in range(3):
        opt.step(closure)
    assert len(masks) == 6
    for step in range(3):
        assert torch.equal(masks[2 * step], masks[2 * step + 1])
        assert draws[2 * step] == draws[2 * step + 1]
    assert not torch.equal(masks[0], masks[2])


def test_rng_advances_as_after_one_forward():
    model, x, y = make_mlp(seed=4, dropout=0.5)
    opt = PAL(model.parameters())
    closure = model_closure(opt, model, x, y)
    torch.manual_seed(123)
    opt.step(closure)
    after_step = torch.get_rng_state()
    torch.manual_seed(123)
    with torch.enable_grad():
        closure()
    assert torch.equal(after_step, torch.get_rng_state())


def test_same_seed_same_trajectory():
    def run():
        model, x, y = make_mlp(seed=5, dropout=0.3)
        torch.manual_seed(77)
        return run_trajectory(model, PAL(model.parameters()), x, y, 5)

    assert_same_trajectory(run(), run())


def test_batchnorm_stats_move_once_per_step():
    model, x, y = make_mlp(seed=6, batchnorm=True)
    opt = PAL(model.parameters())
    closure = model_closure(opt, model, x, y)
    bn = model[1]
    for step in range(1, 4):
        reference = copy.deepcopy(model)
        with torch.no_grad():
            reference(x)  # one train-mode forward at θ, on the same batch
        opt.step(closure)
        assert int(bn.num_batches_tracked) == step
        assert torch.equal(bn.running_mean, reference[1].running_mean)
        assert torch.equal(bn.running_var, reference[1].running_var)


def test_two_forwards_one_backward_per_step():
    model, x, y = make_mlp(seed=7)
    opt = PAL(model.parameters())
    counter = Counter()
    closure = model_closure(opt, model, x, y, counter=counter)
    for step in range(1, 5):
        opt.step(closure)
        assert (counter.forwards, counter.backwards) == (2 * step, step)


def test_always_backward_closure_same_trajectory():
    model_a, x, y = make_mlp(seed=8, dropout=0.3)
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = PAL(model_a.parameters()), PAL(model_b.parameters())
    torch.manual_seed(9)
    skip = run_trajectory(model_a, opt_a, x, y, 5, style="skip")
    rng_a = torch.get_rng_state()
    torch.manual_seed(9)
    always = run_trajectory(model_b, opt_b, x, y, 5, style="always")
    assert_same_trajectory(skip, always)
    assert torch.equal(rng_a, torch.get_rng_state())
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def test_grad_after_step_is_gradient_at_start():
    model, x, y = make_mlp(seed=10)
    opt = PAL(model.parameters())
    start = copy.deepcopy(model)
    nn.functional.mse_loss(start(x), y).backward()
    for style in ("skip", "always"):
        trial = copy.deepcopy(model)
        opt = PAL(trial.parameters())
        opt.step(model_closure(opt, trial, x, y, style=style))
        for p, q in zip(trial.parameters(), start.parameters()):
            assert torch.equal(p.grad, q.grad)


def test_step_without_closure_raises():
    theta = nn.Parameter(torch.zeros(2))
    opt = PAL([theta])
    assert PAL.requires_closure and requires_closure(opt)
    with pytest.raises(TypeError, match="closure"):
        opt.step()


def test_in_place_zero_grad_closure_keeps_direction_and_grad():
    # zero_grad(set_to_none=False) zeroes and refills the .grad tensors in place; the measuring
    # call must not reach the gradient at θ that the direction update still needs.
    model_a, x, y = make_mlp(seed=14)
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = PAL(model_a.parameters()), PAL(model_b.parameters())
    reference = run_trajectory(model_a, opt_a, x, y, 4, style="always")

    def closure():
        opt_b.zero_grad(set_to_none=False)
        loss = nn.functional.mse_loss(model_b(x), y)
        loss.backward()
        return loss

    in_place = []
    for _ in range(4):
        loss = opt_b.step(closure)
        in_place.append((loss.item(), params_snapshot(model_b), opt_b.diagnostics()["case"]))
    assert_same_trajectory(reference, in_place)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def test_closure_error_in_measuring_forward_restores_state():
    theta = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = PAL([theta])

    def closure():
        if not torch.is_grad_enabled():
            raise RuntimeError("broken data loader")
        torch.rand(3)
        opt.zero_grad()
        loss = (theta**2).sum()
        loss.backward()
        return loss

    before = theta.detach().clone()
    torch.manual_seed(0)
    torch.rand(3)
    after_one_forward = torch.get_rng_state()
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="broken data loader"):
        opt.step(closure)
    assert torch.equal(torch.get_rng_state(), after_one_forward)
    assert torch.equal(theta.detach(), before)
    assert torch.equal(theta.grad, 2 * before)
    assert torch.equal(opt.state[theta]["direction_buffer"], torch.zeros(2))


# --- non-finite losses --------------------------------------------------------------------------


def test_nan_measured_loss_leaves_params_bitwise_unchanged():
    model, x, y = make_mlp(seed=11)
    opt = PAL(model.parameters())
    run_trajectory(model, opt, x, y, 2)  # a non-zero direction buffer
    before = params_snapshot(model)
    buffers = [opt.state[p]["direction_buffer"].clone() for p in model.parameters()]
    forward = model_closure(opt, model, x, y)

    def closure():
        loss = forward()
        return loss if torch.is_grad_enabled() else loss * float("nan")

    loss = opt.step(closure)
    assert math.isfinite(loss.item())
    for p, p0, d0 in zip(model.parameters(), before, buffers):
        assert torch.equal(p.detach(), p0)
        assert torch.equal(opt.state[p]["direction_buffer"], d0)
    diag = opt.diagnostics()
    assert diag["case"] == "nonfinite" and diag["num_nonfinite"] == 1
    assert diag["step"] == 0.0 and math.isnan(diag["loss_mu"])
    assert diag["num_steps"] == 3


@pytest.mark.parametrize("where", ["loss0", "grad"])
def test_nonfinite_first_forward_skips_step(where):
    # sqrt at 0 has a finite value and an infinite derivative.
    theta = nn.Parameter(torch.tensor([0.0, 1.0]))
    opt = PAL([theta])
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = theta.sqrt().sum()
        if where == "loss0":
            loss = loss * float("inf")
        loss.backward()
        return loss

    before = theta.detach().clone()
    opt.step(closure)
    assert calls == [True]
    assert torch.equal(theta.detach(), before)
    diag = opt.diagnostics()
    assert diag["case"] == "nonfinite" and diag["step"] == 0.0
    assert torch.equal(opt.state[theta].get("direction_buffer", torch.zeros(2)), torch.zeros(2))


# --- state_dict ---------------------------------------------------------------------------------


def test_state_dict_round_trip_continues_identically():
    model, x, y = make_mlp(seed=12, dropout=0.2)
    opt = PAL(model.parameters())
    torch.manual_seed(3)
    run_trajectory(model, opt, x, y, 3)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_rng = torch.get_rng_state()
    uninterrupted = run_trajectory(model, opt, x, y, 4)

    resumed_model, _, _ = make_mlp(seed=99, dropout=0.2)
    resumed_model.load_state_dict(saved_model)
    resumed_opt = PAL(resumed_model.parameters())
    resumed_opt.load_state_dict(saved_opt)
    torch.set_rng_state(saved_rng)
    resumed = run_trajectory(resumed_model, resumed_opt, x, y, 4)
    assert_same_trajectory(uninterrupted, resumed)
    assert resumed_opt.diagnostics()["num_steps"] == 7
    assert set(saved_opt["state"][0]) >= {"direction_buffer", "num_steps"}


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"measuring_step": 0.0}, "measuring_step"),
        ({"measuring_step": -1.0}, "measuring_step"),
        ({"measuring_step": float("nan")}, "measuring_step"),
        ({"max_step": 0.0}, "max_step"),
        ({"direction_decay": -0.1}, "direction_decay"),
        ({"direction_decay": 1.0}, "direction_decay"),
        ({"update_factor": 0.0}, "update_factor"),
        ({"exact_slope": "yes"}, "exact_slope"),
    ],
)
def test_invalid_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        PAL([nn.Parameter(torch.zeros(1))], **kwargs)


# --- it optimises -------------------------------------------------------------------------------


def test_reduces_mlp_regression_loss():
    model, x, y = make_mlp(seed=13, width=32)
    opt = PAL(model.parameters(), measuring_step=0.1)
    closure = model_closure(opt, model, x, y)
    first = opt.step(closure).item()
    for _ in range(60):
        last = opt.step(closure).item()
    assert last < 0.5 * first


def test_reduces_ill_conditioned_quadratic():
    scales = torch.tensor([1.0, 10.0], dtype=torch.float64)
    theta = nn.Parameter(torch.tensor([3.0, -2.0], dtype=torch.float64))
    opt = PAL([theta])
    closure = scalar_closure(opt, theta, lambda t: 0.5 * (scales * t**2).sum())
    first = opt.step(closure).item()
    for _ in range(50):
        last = opt.step(closure).item()
    assert last < 1e-3 * first


def test_reduces_rosenbrock():
    theta = nn.Parameter(torch.tensor([-1.5, 2.0], dtype=torch.float64))
    opt = PAL([theta], measuring_step=0.1, max_step=0.5)

    def rosenbrock(t):
        return (1 - t[0]) ** 2 + 100 * (t[1] - t[0] ** 2) ** 2

    closure = scalar_closure(opt, theta, rosenbrock)
    first = opt.step(closure).item()
    for _ in range(300):
        last = opt.step(closure).item()
    assert last < 0.05 * first
