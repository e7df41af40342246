"""The benchmark suite (experiment=bench_small): its expansion, its equal-budget rule, the peers,
and a real (small) suite sweep read back by the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from metaopt.errors import ConfigError
from metaopt.optim import PEERS, REGISTRY, set_mode
from metaopt.sweeper import grid_points, plan
from metaopt.train import train
from tests.test_cli import metaopt

TASKS = {"linreg": {"trainer.steps": 40}, "two_moons": None}
OPTS = {"adam": {"grid": {"optimizer.lr": [1e-3, 1e-2]}},
        "pal": {"grid": {"optimizer.measuring_step": [0.1, 1.0]}},
        "absent_peer": {"grid": {"optimizer.lr": [1.0, 2.0]}, "requires": "no_such_package_xyz"}}


def test_grid_points_are_the_product_of_the_keys():
    assert grid_points({"a": [1, 2], "b": ["x", None]}) == [
        ["a=1", "b=x"], ["a=1", "b=null"], ["a=2", "b=x"], ["a=2", "b=null"]]
    assert grid_points(None) == [[]]


def test_plan_crosses_tasks_optimizers_and_each_grid_and_skips_missing_peers():
    jobs, skipped = plan(TASKS, OPTS)
    assert len(jobs) == 2 * 2 * 2
    assert ["task=linreg", "trainer.steps=40", "optimizer=pal", "optimizer.measuring_step=1.0"] in jobs
    assert ["task=two_moons", "optimizer=adam", "optimizer.lr=0.001"] in jobs
    assert skipped and "absent_peer" in skipped[0] and "pip install -e '.[peers]'" in skipped[0]


def test_plan_refuses_unequal_tuning_budgets():
    unequal = {**OPTS, "sgd": {"grid": {"optimizer.lr": [0.1, 0.2, 0.3]}}}
    with pytest.raises(ConfigError, match=r"same number of grid points.*sgd: 3"):
        plan(TASKS, unequal)
    assert len(plan(TASKS, unequal, equal_budget=False)[0]) == 2 * (2 + 2 + 3)


def test_plan_selection_narrows_and_unknown_names_list_the_choices():
    jobs, _ = plan(TASKS, OPTS, {"task": ["two_moons"], "optimizer": ["pal"]})
    assert {j[0] for j in jobs} == {"task=two_moons"} and {j[1] for j in jobs} == {"optimizer=pal"}
    with pytest.raises(ConfigError, match=r"optimizer=lion: not in this suite; valid choices: adam, pal"):
        plan(TASKS, OPTS, {"optimizer": ["lion"]})
    with pytest.raises(ConfigError, match=r"unknown key"):
        plan(TASKS, {"adam": {"grid": {}, "budget": 3}})


def _suite(experiment: str):
    from hydra import compose, initialize_config_dir

    from metaopt.config import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={experiment}"], return_hydra_config=True)


def test_bench_resnet_is_the_same_protocol_on_resnet():
    cfg = _suite("bench_resnet")
    assert list(cfg.hydra.sweeper.tasks) == ["resnet"] and cfg.task._target_.endswith("ResNetCIFAR10")
    assert cfg.hydra.sweeper.optimizers == _suite("bench_small").hydra.sweeper.optimizers


def test_bench_small_gives_every_optimizer_the_same_number_of_points():
    from metaopt.config import config_dir

    sweeper = _suite("bench_small").hydra.sweeper
    jobs, skipped = plan(sweeper.tasks, sweeper.optimizers)
    assert len({len(grid_points(o["grid"])) for o in sweeper.optimizers.values()}) == 1
    assert set(sweeper.tasks) == {"quadratic", "rosenbrock", "linreg", "two_moons", "mnist1d", "digits"}
    # Every optimizer of the suite has a config and a registry entry (the contract suite covers it).
    conf_names = {p.stem for p in (config_dir() / "optimizer").glob("*.yaml")}
    registered = {spec.cls for spec in REGISTRY.values()}
    for name, entry in sweeper.optimizers.items():
        assert name in conf_names
        if entry.get("requires"):  # a peer: registered when its package is installed
            continue
        target = OmegaConf.load(config_dir() / "optimizer" / f"{name}.yaml")["_target_"]
        assert get_class(target) in registered, name  # so the contract suite covers its class
    assert len(jobs) == len(sweeper.tasks) * (len(sweeper.optimizers) - len(skipped)) * 6


class _TwoMode(torch.optim.SGD):
    """Records the train/eval switches the loop makes (as Schedule-Free needs them)."""

    calls: list[str] = []

    def train(self):
        self.calls.append("train")

    def eval(self):
        self.calls.append("eval")

    def step(self, closure=None):
        assert not self.calls or self.calls[-1] == "train", "stepped in eval mode"
        return super().step(closure)


def test_loop_switches_two_mode_optimizers_to_eval_around_every_evaluation(make_cfg, tmp_path):
    _TwoMode.calls = []
    cfg = make_cfg("task=rosenbrock", "optimizer=sgd", f"optimizer._target_={__name__}._TwoMode", "optimizer.lr=1e-3")
    train(cfg, run_dir=tmp_path)
    evals = cfg.trainer.steps // cfg.trainer.eval_every  # 2 in-loop evaluations; final reuses the last
    assert _TwoMode.calls[0] == "train" and _TwoMode.calls.count("eval") == evals
    assert all(a != b for a, b in zip(_TwoMode.calls, _TwoMode.calls[1:]))  # strictly alternating


def test_set_mode_rejects_unknown_modes_and_leaves_plain_optimizers_alone():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    set_mode(opt, "eval")
    with pytest.raises(ValueError, match="mode"):
        set_mode(opt, "test")


@pytest.mark.skipif("schedulefree_adamw" not in PEERS, reason="pip install 'metaopt[peers]'")
def test_schedule_free_is_evaluated_at_its_average(make_cfg, tmp_path):
    cfg = make_cfg("task=two_moons", "optimizer=schedulefree_adamw", "optimizer.lr=0.05")
    train(cfg, run_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final"]["val/loss"] < 0.5


def test_missing_optimizer_package_is_one_line_naming_the_extra(make_cfg, tmp_path):
    cfg = make_cfg("task=rosenbrock", "optimizer._target_=no_such_package_xyz.Opt")
    with pytest.raises(ConfigError, match=r"optimizer \(no_such_package_xyz.Opt\): module 'no_such_package_xyz' "
                                          r"is not installed.*pip install -e '\.\[peers\]' in the metaopt checkout"):
        train(cfg, run_dir=tmp_path)


@pytest.mark.slow
def test_small_suite_sweep_runs_every_point_and_reports_it(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    proc = metaopt("-m", "experiment=bench_small", "task=linreg,rosenbrock", "optimizer=adam,sgd,lbfgs",
                   "seed=0,1", "hydra.sweeper.tasks.linreg={trainer.steps: 30, trainer.eval_every: 10}",
                   "hydra.sweeper.tasks.rosenbrock={trainer.steps: 30, trainer.eval_every: 10}",
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path, data_dir=data_dir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert len(summaries) == 2 * 3 * 6 * 2 == len((sweep / "suite_jobs.txt").read_text().splitlines())
    from metaopt.report.__main__ import main as report

    report([str(sweep)])
    table = (sweep / "report" / "table.csv").read_text()
    for opt in ("adam", "sgd", "lbfgs"):
        assert f",{opt}," in table
    assert "(best of 6)" in (sweep / "report" / "report.md").read_text()
    assert Path(sys.executable).exists()


def test_shipped_learned_optimizer_loads_by_name_and_unknown_names_list_the_choices(make_cfg, tmp_path):
    from metaopt.learned import Learned

    cfg = make_cfg("task=linreg", "optimizer=learned_rnn_linreg")
    train(cfg, run_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final"]["val/loss"] < 1.0
    from hydra.utils import instantiate

    opt = instantiate(cfg.optimizer)([torch.zeros(3, requires_grad=True)])
    assert isinstance(opt, Learned) and not opt.lopt.is_idle()  # meta-trained weights, not the idle init
    with pytest.raises(ConfigError, match=r"pretrained: no shipped weights 'nope'; valid choices: gru_linreg"):
        train(make_cfg("task=linreg", "optimizer=learned_rnn_linreg", "optimizer.checkpoint=${pretrained:nope}"),
              run_dir=tmp_path / "bad")
