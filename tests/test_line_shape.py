"""Line-shape analysis (metaopt.analysis.line_shape) and the PAL experiments' configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from metaopt.analysis import (
    Line,
    LineShapeProbe,
    Parabola,
    is_locally_convex,
    line_minimum,
    loss_along_line,
    probe_line,
    summarize,
)
from metaopt.config import config_dir
from metaopt.tasks.base import Task
from metaopt.train import Components, train

TIMING_KEYS = {"time"}


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny: on shared cores a second intra-op thread only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def quadratic_problem():
    """``f(w) = ½(w−c)ᵀA(w−c) + k`` in float64: exactly a parabola along any line."""
    gen = torch.Generator().manual_seed(0)
    n = 6
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    A = q @ torch.diag(torch.linspace(0.5, 4.0, n, dtype=torch.float64)) @ q.T
    c = torch.randn(n, generator=gen, dtype=torch.float64)
    w = torch.randn(n, generator=gen, dtype=torch.float64).requires_grad_()
    k = 0.3

    def loss():
        r = w - c
        return 0.5 * r @ A @ r + k

    return w, A, c, loss


def test_exact_parabola_is_recovered_with_its_minimum():
    w, A, c, loss = quadratic_problem()
    w_before = w.detach().clone()
    g = (A @ (w - c)).detach()
    d = -g + 0.3 * torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u = d / d.norm()
    # Along u: l(s) = l0 + b s + a s², with b = gᵀu, a = ½ uᵀAu.
    b_true, a_true = float(g @ u), 0.5 * float(u @ A @ u)
    s_true = -b_true / (2 * a_true)

    with Line(loss, [w], [d]) as line:
        shape = probe_line(line, mu=0.7, update_factor=1.0, max_step=100.0)

    assert shape.parabola.b == pytest.approx(b_true, rel=1e-10)
    assert shape.parabola.a == pytest.approx(a_true, rel=1e-8)
    assert shape.parabola.vertex == pytest.approx(s_true, rel=1e-8)
    assert shape.line_min.bracketed and shape.line_min.s == pytest.approx(s_true, rel=1e-5)
    assert shape.pal_case == "parabola" and shape.chosen_step == pytest.approx(s_true, rel=1e-8)
    assert shape.rel_distance_vertex < 1e-5 and shape.rel_distance_step < 1e-5
    assert shape.improvement_ratio == pytest.approx(1.0, abs=1e-8)
    assert shape.locally_convex and shape.convex_ahead
    assert shape.parabola_r2 == pytest.approx(1.0, abs=1e-10)
    sampled = np.asarray(shape.grid)
    assert np.allclose(shape.losses, shape.parabola(sampled), rtol=1e-10, atol=0)
    assert 0.0 in shape.grid and min(shape.grid) < 0 < s_true < max(shape.grid)
    assert torch.equal(w.detach(), w_before)  # parameters back bitwise

    # PAL's default update_factor overshoots the vertex by 1/0.6; the distance says so.
    with Line(loss, [w], [d]) as line:
        default = probe_line(line, mu=0.7, max_step=100.0)
    assert default.rel_distance_step == pytest.approx(1 / 0.6 - 1, rel=1e-4)


def test_parabola_from_pal_points():
    p = Parabola(l0=2.0, b=-3.0, a=1.5)
    q = Parabola.from_pal(l0=2.0, b=-3.0, l_mu=p(0.4), mu=0.4)
    assert q.a == pytest.approx(1.5) and q.vertex == pytest.approx(1.0) and q.convex
    assert math.isnan(Parabola(1.0, -1.0, -0.2).vertex) and not Parabola(1.0, -1.0, -0.2).convex


def test_minimum_beyond_the_grid_is_found_by_extension():
    def f(s):
        return (s - 10.0) ** 2

    grid = np.linspace(-0.5, 2.0, 11)
    coarse = line_minimum(grid, [f(s) for s in grid])
    assert coarse.s == 2.0 and not coarse.bracketed
    fine = line_minimum(grid, [f(s) for s in grid], f)
    assert fine.bracketed and fine.s == pytest.approx(10.0, abs=1e-4)
    left = line_minimum(grid, [f(-s - 12.0) for s in grid], lambda s: f(-s - 12.0))
    assert left.bracketed and left.s == pytest.approx(-22.0, abs=1e-4)


def test_convexity_tolerates_rounding_but_not_bends():
    s = np.linspace(0.0, 2.0, 41)
    convex = (s - 0.7) ** 2 + 1.0
    noisy = (convex.astype(np.float32) + np.float32(1e-7) * np.sign(np.sin(7 * s))).astype(np.float64)
    assert is_locally_convex(s, convex) and is_locally_convex(s, noisy)
    assert not is_locally_convex(s, np.cos(s))  # concave
    assert not is_locally_convex(s, np.tanh(3 * (s - 0.5)) + (s - 0.5) ** 2)  # an inflection
    assert not is_locally_convex(s, np.where(s == s[5], np.nan, convex))


class DropoutBNTask(Task):
    """A fixed regression minibatch through Linear-BatchNorm-ReLU-Dropout-Linear."""

    def __init__(self):
        super().__init__(seed=0)
        gen = torch.Generator().manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                                   nn.Linear(16, 1))
        self.x = torch.randn(32, 4, generator=gen)
        self.y = torch.randn(32, 1, generator=gen)

    def batch(self, step):
        return self.x + 0.01 * step, self.y

    def loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def evaluate(self, split):
        return {}


def test_line_repeats_the_dropout_mask_and_restores_the_rng():
    task = DropoutBNTask()
    params = list(task.model.parameters())
    direction = [torch.randn_like(p) for p in params]
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    losses = loss_along_line(lambda: task.loss(task.batch(0)), params, direction, [0.0, 0.5, 0.0])
    assert losses[0] == losses[2]  # same point, same mask
    assert torch.equal(torch.rand(3), expected_next)


def run_loop(task, optimizer, probe, steps, closure_optimizer=False):
    """The loop of metaopt.train._run reduced to the calls a callback sees."""
    c = Components(task, task.model, optimizer, None, closure_optimizer, torch.device("cpu"), probe)
    task.model.train()
    out = []
    for step in range(steps):
        batch = task.batch(step)
        if probe is not None:
            probe.before_step(step, batch, c)
        optimizer.zero_grad()
        loss = task.loss(batch)
        loss.backward()
        optimizer.step()
        if probe is not None:
            out.append(probe.after_step(step, batch, c))
    return out


def test_probe_leaves_params_bn_stats_and_rng_as_without_it(tmp_path):
    states, rngs = [], []
    for use_probe in (False, True):
        torch.manual_seed(0)
        task = DropoutBNTask()
        opt = torch.optim.SGD(task.model.parameters(), lr=0.05, momentum=0.9)
        probe = LineShapeProbe(line_every=None, steps=[1, 3], plot=False, refine_iters=5) if use_probe else None
        if probe is not None:
            probe.on_start(None, tmp_path)
        metrics = run_loop(task, opt, probe, steps=5)
        states.append({k: v.clone() for k, v in task.model.state_dict().items()})
        rngs.append(torch.get_rng_state())
        if probe is not None:
            assert [m is not None for m in metrics] == [False, True, False, True, False]
            assert metrics[1]["line/step"] > 0
    assert states[0].keys() == states[1].keys()
    for key in states[0]:  # weights and BatchNorm running statistics, bitwise
        assert torch.equal(states[0][key], states[1][key]), key
    assert torch.equal(rngs[0], rngs[1])
    records = read_jsonl(tmp_path / "line_shape" / "probes.jsonl")
    assert [r["step"] for r in records] == [1, 3]
    # Any optimizer: the step taken is the distance moved, measured on the line through θ_t.
    assert all(r["chosen_step"] > 0 and r["pal_case"] in ("parabola", "measuring_point", "no_descent")
               for r in records)


def test_probe_rejects_bad_settings():
    with pytest.raises(ValueError, match="line_every"):
        LineShapeProbe(line_every=0)
    with pytest.raises(ValueError, match="line_every"):
        LineShapeProbe(line_every=None, steps=[])
    with pytest.raises(ValueError, match="grid_hi"):
        LineShapeProbe(grid_hi=-1.0)
    assert summarize([])["num_probes"] == 0


def strip(records, added):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS and k not in added} for r in records]


def test_probe_in_a_pal_run_writes_files_and_does_not_change_the_run(make_cfg, tmp_path):
    base = ("task=two_moons", "optimizer=pal")
    train(make_cfg(*base), run_dir=tmp_path / "plain")
    train(make_cfg(*base, "analysis=line_shape", "analysis.line_every=5", "analysis.steps=[4]"),
          run_dir=tmp_path / "probed")

    plain = read_jsonl(tmp_path / "plain" / "metrics.jsonl")
    probed = read_jsonl(tmp_path / "probed" / "metrics.jsonl")
    added = {k for r in probed for k in r if k.startswith("line/")}
    assert added >= {"line/locally_convex", "line/rel_distance_step"}
    assert strip(probed, added) == strip(plain, added)
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("plain", "probed")]
    assert summaries[0]["final"] == summaries[1]["final"]
    assert summaries[0]["passes"] == summaries[1]["passes"]  # the probe's forwards are not counted

    out = tmp_path / "probed" / "line_shape"
    assert sorted(p.name for p in out.glob("*.png")) == [f"step_{s:07d}.png" for s in (0, 4, 5, 10, 15)]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in out.glob("*.png"))
    report = json.loads((out / "line_shape.json").read_text())
    assert report["num_probes"] == 5 and [p["step"] for p in report["probes"]] == [0, 4, 5, 10, 15]
    assert 0.0 <= report["fraction_locally_convex"] <= 1.0
    assert math.isfinite(report["median_rel_distance_step"])

    # Step 4's record (step count 5) carries both PAL's diagnostics and the probe of that step:
    # the probe is on PAL's line, with PAL's own measurements reproduced exactly.
    probe4 = report["probes"][1]
    record = next(r for r in probed if r["step"] == 5)
    assert probe4["loss0"] == record["opt/loss0"] == probe4["parabola"]["l0"]
    assert probe4["loss_mu"] == record["opt/loss_mu"] == probe4["fit_loss_mu"]
    assert probe4["slope"] == pytest.approx(record["opt/slope"], rel=1e-6)
    assert probe4["chosen_step"] == record["opt/step"] == probe4["pal_step"]
    assert probe4["parabola"]["a"] == pytest.approx(record["opt/curvature"], rel=1e-12)


def test_pal_experiments_compose(make_cfg):
    pal = make_cfg("experiment=pal_mnist1d")
    sgd = make_cfg("experiment=pal_mnist1d", "pal_compare=momentum_step")
    assert pal.task._target_ == sgd.task._target_ == "metaopt.tasks.Mnist1D"
    assert pal.optimizer._target_ == "metaopt.optim.PAL" and pal.scheduler._target_ == "metaopt.schedules.constant"
    assert sgd.optimizer._target_ == "torch.optim.SGD" and sgd.optimizer.momentum == 0.9 and sgd.optimizer.lr == 0.1
    assert sgd.scheduler._target_ == "metaopt.schedules.step"
    assert pal.trainer.steps == sgd.trainer.steps == 20  # the command line beats the experiment
    resnet = make_cfg("experiment=pal_resnet", "pal_compare=momentum_step")
    assert resnet.task._target_ == "metaopt.tasks.ResNetCIFAR10" and resnet.scheduler.milestones == [0.5, 0.75]
    for name in ("pal_mnist1d", "pal_resnet"):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"experiment={name}"], return_hydra_config=True)
        assert dict(cfg.hydra.sweeper.params) == {"pal_compare": "pal,momentum_step", "seed": "0,1,2"}
        assert cfg.trainer.steps == {"pal_mnist1d": 3000, "pal_resnet": 64000}[name]


@pytest.mark.parametrize("side", ["pal", "momentum_step"])
def test_tiny_pal_mnist1d_runs(make_cfg, tmp_path, side):
    train(make_cfg("experiment=pal_mnist1d", f"pal_compare={side}"), run_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 20
    assert {"test/accuracy", "val/accuracy"} <= set(summary["final"])
    assert summary["passes"] == {"forward": 40 if side == "pal" else 20, "backward": 20}
