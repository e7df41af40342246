"""Reverse-engineering tools (metaopt.analysis.dynamics, python -m metaopt.analyze) on optimizers
whose mechanisms are known by construction."""

from __future__ import annotations

import json
import math

import pytest
import torch

from metaopt.analysis import (
    PCA,
    adaptation_curve,
    autonomous_schedule,
    clipping_threshold,
    effective_lr,
    fixed_points,
    linearize,
    optimal_heavy_ball,
    sign_step,
    update_function,
)
from metaopt.learned import MLPOptimizer, RNNOptimizer, save_lopt

D = torch.float64


def momentum_cell(beta):
    """Heavy ball m ← βm + g, Δθ = −α m, written as cell/readout (the readout is set per test)."""
    return lambda h, x: beta * h + x


def test_heavy_ball_is_one_mode_with_its_beta_and_alpha():
    beta, alpha = 0.9, 0.3
    cell, readout = momentum_cell(beta), lambda h: -alpha * h.sum()
    fp = fixed_points(cell, torch.zeros(1, dtype=D), torch.randn(6, 1, dtype=D))
    assert fp.points.shape == (6, 1)
    assert fp.points.abs().max() < 1e-6 and fp.speeds.max() < 1e-8
    (mode,) = linearize(cell, readout, fp.points[0], torch.zeros(1, dtype=D))
    assert mode.beta == pytest.approx(beta, abs=1e-4)
    assert mode.eigenvalue.real == pytest.approx(beta, abs=1e-4)
    assert mode.alpha == pytest.approx(alpha, rel=1e-6)
    assert mode.timescale == pytest.approx(1 / (1 - beta), rel=1e-6)
    # a constant gradient drives the state to its own fixed point g/(1−β)
    g = 0.5
    fp = fixed_points(cell, torch.tensor([g], dtype=D), torch.zeros(1, 1, dtype=D))
    assert fp.points[0, 0].item() == pytest.approx(g / (1 - beta), rel=1e-8)


def test_aggregated_momentum_is_two_modes():
    # Lucas et al., "Aggregated momentum" (ICLR 2019): two momentum buffers summed by the readout.
    betas, alphas = torch.tensor([0.5, 0.95], dtype=D), torch.tensor([0.2, 0.05], dtype=D)
    cell = lambda h, x: betas * h + x  # noqa: E731
    readout = lambda h: -(alphas * h).sum()  # noqa: E731
    # mixing the coordinates must not change the modes: the tools see only cell and readout
    q, _ = torch.linalg.qr(torch.randn(2, 2, dtype=D))
    mixed_cell = lambda h, x: q @ cell(q.T @ h, x)  # noqa: E731
    mixed_readout = lambda h: readout(q.T @ h)  # noqa: E731
    modes = linearize(mixed_cell, mixed_readout, torch.zeros(2, dtype=D), torch.zeros(1, dtype=D))
    assert [m.beta for m in modes] == pytest.approx([0.95, 0.5], abs=1e-8)  # sorted by |λ|
    assert [m.alpha for m in modes] == pytest.approx([0.05, 0.2], rel=1e-8)
    assert [m.timescale for m in modes] == pytest.approx([20.0, 2.0], rel=1e-8)


def test_encoded_input_scales_alpha():
    beta, alpha, s = 0.8, 0.1, 3.0
    modes = linearize(momentum_cell(beta), lambda h: -alpha * h.sum(), torch.zeros(1, dtype=D),
                      torch.zeros(1, dtype=D), encode=lambda g: (s * g).reshape(1))
    assert modes[0].alpha == pytest.approx(alpha * s, rel=1e-6)


def test_oscillating_mode_reports_modulus():
    # a rotation by ω with decay r: complex pair, β = r for both
    r, w = 0.9, 0.3
    j = torch.tensor([[r * math.cos(w), -r * math.sin(w)], [r * math.sin(w), r * math.cos(w)]], dtype=D)
    cell = lambda h, x: j @ h + torch.cat([x, torch.zeros(1, dtype=D)])  # noqa: E731
    modes = linearize(cell, lambda h: -h[0], torch.zeros(2, dtype=D), torch.zeros(1, dtype=D))
    assert [m.beta for m in modes] == pytest.approx([r, r], abs=1e-10)
    assert modes[0].eigenvalue == pytest.approx(modes[1].eigenvalue.conjugate())
    # the pair together gives the instantaneous response of the readout: α₁ + α₂ = 1
    assert sum(m.alpha for m in modes) == pytest.approx(1.0, rel=1e-8)


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_tanh_update_clips_at_c(c):
    cell = lambda h, x: c * torch.tanh(x / c)  # noqa: E731
    readout = lambda h: -h.sum()  # noqa: E731
    h = torch.zeros(1, dtype=D)
    gs = torch.linspace(-20 * c, 20 * c, 801, dtype=D)
    u = update_function(cell, readout, h, gs)
    assert u == pytest.approx(-c * torch.tanh(gs / c), abs=1e-12)
    slope = -effective_lr(cell, readout, h)
    assert slope == pytest.approx(-1.0, abs=1e-8)
    clip = clipping_threshold(gs, u, slope=slope)
    assert clip["threshold"] == pytest.approx(c, rel=1e-3)
    # each side measured from its own limit at 0, extrapolated from a grid of step c/20
    assert clip["positive"] == pytest.approx(clip["negative"], rel=1e-3)
    assert abs(clip["jump"]) < 1e-3 * c
    # without the exact slope: from the grid, to its resolution
    assert clipping_threshold(gs, u)["threshold"] == pytest.approx(c, rel=2e-2)


def test_linear_update_does_not_clip():
    gs = torch.linspace(-5, 5, 101, dtype=D)
    clip = clipping_threshold(gs, -0.1 * gs)
    assert clip["threshold"] is None and clip["slope_at_zero"] == pytest.approx(-0.1)


def test_sign_update_is_a_jump():
    # Δθ = −0.3·sign g − 0.01·g: signSGD plus a little SGD
    cell = lambda h, x: torch.stack([torch.sign(x[0]), x[0]])  # noqa: E731
    readout = lambda h: -0.3 * h[0] - 0.01 * h[1]  # noqa: E731
    h = torch.zeros(2, dtype=D)
    gs = torch.linspace(-1, 1, 100, dtype=D)  # 0 not on the grid
    clip = clipping_threshold(gs, update_function(cell, readout, h, gs))
    assert clip["jump"] == pytest.approx(0.3, rel=1e-8)
    assert clip["slope_at_zero"] == pytest.approx(-0.01, rel=1e-8)
    assert sign_step(cell, readout, h) == pytest.approx(0.3, rel=1e-8)
    assert effective_lr(cell, readout, h) == pytest.approx(0.01, rel=1e-6)


def test_decaying_gain_gives_its_schedule():
    # state [s, u]: s ← γ s (a gain decaying by itself), u ← s·g; Δθ = −u = −s_{t−1} g
    gamma, s0 = 0.8, 0.5
    cell = lambda h, x: torch.stack([gamma * h[0], h[0] * x[0]])  # noqa: E731
    readout = lambda h: -h[1]  # noqa: E731
    sched = autonomous_schedule(cell, readout, torch.tensor([s0, 0.0], dtype=D), 10)
    expected = s0 * gamma ** torch.arange(10, dtype=D)
    assert sched.lr == pytest.approx(expected, rel=1e-8)
    assert sched.drift.abs().max() == 0 and sched.sign_step.abs().max() < 1e-12
    assert sched.states.shape == (11, 2)


def test_warmup_schedule():
    # s ← s + (1 − s)/5 from 0: the learning rate rises to 1 (warm-up)
    cell = lambda h, x: torch.stack([h[0] + (1 - h[0]) / 5, h[0] * x[0]])  # noqa: E731
    sched = autonomous_schedule(cell, lambda h: -h[1], torch.zeros(2, dtype=D), 30)
    assert sched.lr[0] == 0 and (sched.lr[1:] > sched.lr[:-1]).all() and sched.lr[-1] > 0.99


def test_adaptation_curve_of_normalised_update():
    # RMS-normalised step: v ← ρ v + (1−ρ) g², Δθ = −g/√(v + δ). At the fixed point of a constant
    # g, v* = g², and one more step with g' gives Δθ = −g'/√(ρg² + (1−ρ)g'² + δ), whose slope at
    # g' = g is (ρg² + δ)/(g² + δ)^{3/2}: about 1/|g|, falling with |g| (RMSProp's adaptation).
    rho, delta = 0.9, 0.01

    def cell(h, x):
        v = rho * h[0] + (1 - rho) * x[0] ** 2
        return torch.stack([v, x[0] / torch.sqrt(v + delta)])

    readout = lambda h: -h[1]  # noqa: E731
    gs = torch.linspace(-1, 1, 9, dtype=D)
    curve = adaptation_curve(cell, readout, gs, h0=torch.zeros(2, dtype=D))
    assert curve.speeds.max() < 1e-8
    assert curve.points[:, 0] == pytest.approx(gs ** 2, abs=1e-6)
    assert curve.lr == pytest.approx((rho * gs ** 2 + delta) / (gs ** 2 + delta) ** 1.5, rel=1e-6)
    assert curve.lr[4] > curve.lr[0] and curve.lr[4] > curve.lr[-1]
    assert curve.update == pytest.approx(-gs / torch.sqrt(gs ** 2 + delta), rel=1e-8)


def test_adaptation_curve_needs_a_start_for_plain_cells():
    with pytest.raises(ValueError, match="h0"):
        adaptation_curve(momentum_cell(0.9), lambda h: -h.sum(), [0.0, 1.0])


def test_fixed_points_drops_slow_points_and_outliers():
    # h ← h − 0.1 (h³ − h): fixed points −1, 0, 1; with x shifting, they move but stay isolated.
    cell = lambda h, x: h - 0.1 * (h ** 3 - h) + 0 * x  # noqa: E731
    starts = torch.cat([torch.linspace(-1.5, 1.5, 30, dtype=D).unsqueeze(1),
                        torch.tensor([[40.0]], dtype=D)])
    fp = fixed_points(cell, torch.zeros(1, dtype=D), starts, steps=2000)
    found = sorted({round(v, 6) for v in fp.points[:, 0].tolist()})
    assert set(found) <= {-1.0, 0.0, 1.0}
    assert fp.kept.numel() == 31 and fp.speeds.max() < 1e-8


def test_optimal_heavy_ball():
    a, b = optimal_heavy_ball(1e-2, 1.0)
    assert a == pytest.approx(4 / 1.1 ** 2) and b == pytest.approx((0.9 / 1.1) ** 2)
    with pytest.raises(ValueError):
        optimal_heavy_ball(2.0, 1.0)


def test_pca_projects_on_the_dominant_direction():
    t = torch.randn(200, 1, dtype=D)
    x = torch.cat([3 * t, 0.01 * torch.randn(200, 2, dtype=D)], 1)
    pca = PCA.fit(x, k=2)
    assert pca.explained[0] > 0.99
    assert pca.components[0].abs() @ torch.tensor([1.0, 0, 0], dtype=D) > 0.999
    assert pca.transform(x).shape == (200, 2)


def test_momentum_init_gru_is_clipped_heavy_ball():
    beta, clip, lr = 0.9, 2.0, 0.05
    lopt = RNNOptimizer(hidden_size=8, input_encoding="scaled", input_scale=0.5, init="momentum",
                        init_momentum=beta, init_clip=clip, init_lr=lr).double()
    h0 = lopt.initial_state().detach()
    x0 = lopt.encode(torch.zeros((), dtype=D))
    fp = fixed_points(lopt.cell, x0, h0 + 0.1 * torch.randn(4, 8, dtype=D))
    assert fp.speeds.max() < 1e-8
    modes = linearize(lopt.cell, lopt.readout, fp.points[0], x0, encode=lopt.encode)
    reached = [m for m in modes if abs(m.alpha) > 1e-9]
    assert len(reached) == 1  # the other units never reach the readout
    assert reached[0].beta == pytest.approx(beta, abs=1e-4)
    assert reached[0].alpha == pytest.approx(lr, rel=1e-4)
    gs = torch.linspace(-40, 40, 801, dtype=D)
    u = update_function(lopt.cell, lopt.readout, h0, gs, encode=lopt.encode)
    slope = -effective_lr(lopt.cell, lopt.readout, h0, encode=lopt.encode)
    assert slope == pytest.approx(-lr, rel=1e-6)
    assert clipping_threshold(gs, u, slope=slope)["threshold"] == pytest.approx(clip, rel=1e-3)
    sched = autonomous_schedule(lopt.cell, lopt.readout, h0, 5, encode=lopt.encode)
    assert sched.lr == pytest.approx(torch.full((5,), lr, dtype=D), rel=1e-6)  # no schedule
    curve = adaptation_curve(lopt.cell, lopt.readout, torch.linspace(-4, 4, 5, dtype=D),
                             encode=lopt.encode)  # h0 from the bound method's optimizer
    # at h*(g) the update is −α c (1−β)·Σβ^k... slope falls as tanh saturates
    assert curve.lr[2] > curve.lr[0] and curve.lr[2] > curve.lr[-1]


def test_log_sign_gru_runs():
    lopt = RNNOptimizer(hidden_size=6, seed=1).double()
    with torch.no_grad():
        lopt.readout_weight.normal_()
    h0 = lopt.initial_state().detach()
    x0 = lopt.encode(torch.zeros((), dtype=D))
    fp = fixed_points(lopt.cell, x0, h0.unsqueeze(0), steps=200)
    modes = linearize(lopt.cell, lopt.readout, fp.all_points[0], x0, encode=lopt.encode)
    assert len(modes) == 6 and all(math.isfinite(m.alpha) for m in modes)
    assert all(m1.beta >= m2.beta for m1, m2 in zip(modes, modes[1:]))


def test_cli_writes_every_figure(tmp_path):
    from metaopt.analyze import FIGURES, main

    lopt = RNNOptimizer(hidden_size=4, input_encoding="scaled", init="momentum", init_clip=0.5,
                        init_lr=0.1)
    run = tmp_path / "run"
    run.mkdir()
    save_lopt(lopt, run / "lopt.pt")
    assert main([str(run), "--tasks", "2", "--dim", "4", "--steps", "15", "--starts", "6",
                 "--num-g", "5", "--progress", "none"]) == 0
    out = run / "analysis"
    for name in FIGURES:
        assert (out / f"{name}.png").stat().st_size > 1000
    data = json.loads((out / "analysis.json").read_text())
    dom = data["linearization"]["dominant_mode"]
    assert dom["beta"] == pytest.approx(0.9, abs=1e-4) and dom["alpha"] == pytest.approx(0.1, rel=1e-4)
    assert data["schedule"]["lr"] == pytest.approx([0.1] * 15, rel=1e-5)
    assert "momentum" in (out / "summary.md").read_text()
    # Its falling learning rate at large constant |g| is the tanh clipping, which the finding names.
    adaptation = [line for line in data["findings"] if line.startswith("adaptation")]
    assert adaptation and all("or the clipping at |g| ≈ 0.5" in line for line in adaptation)

    from metaopt.analyze import _findings

    flipped = {**data, "schedule": {**data["schedule"], "lr": [-v for v in data["schedule"]["lr"]],
                                    "first_lr": -0.1, "peak_lr": -0.1, "last_lr": -0.1}}
    assert "schedule: constant of a negative lr" in "\n".join(_findings(flipped))


def test_cli_reads_the_runs_task_settings(tmp_path):
    from metaopt.analyze import analyze

    save_lopt(RNNOptimizer(hidden_size=3, seed=2), tmp_path / "lopt.pt")  # idle: zero readout
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "task: {eig_min: 0.01, eig_max: 4.0, dim: 3}\nmeta: {horizon: 7}\n")
    r = analyze(tmp_path, tasks=1, starts=4, num_g=3, progress="none")
    assert r["curvature"] == [0.01, 4.0] and r["dim"] == 3 and len(r["schedule"]["lr"]) == 7
    assert r["linearization"]["optimal_heavy_ball"]["beta"] == pytest.approx((1.9 / 2.1) ** 2)
    assert r["linearization"]["sum_alpha"] == 0  # an idle optimizer has no momentum
    assert r["idle"] and r["findings"][0].startswith("idle: the readout is zero")


def test_cli_rejects_non_recurrent_and_missing(tmp_path, capsys):
    from metaopt.analyze import main

    save_lopt(MLPOptimizer(), tmp_path / "lopt.pt")
    assert main([str(tmp_path / "lopt.pt"), "--progress", "none"]) == 2
    assert "not a recurrent learned optimizer" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing"), "--progress", "none"]) == 2
    assert "no learned-optimizer weights" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main([str(tmp_path / "metrics.jsonl"), "--progress", "none"]) == 2
    assert "is not a learned-optimizer file" in capsys.readouterr().err
