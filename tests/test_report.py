"""``python -m metaopt.report``: numbers of the table and profile on hand-made sweeps, and a report
on real (tiny) runs.

The fake sweep is built so every number the report prints can be worked out by hand:

task alpha (target val/loss ≤ 0.5), val/loss at steps 10, 20, 30, 40:
  adam lr=0.01  seeds [2, 1, .6, .4] [2, .9, .45, .3] [2, 1.2, .8, .55]   final median .4, steps 40/30/∞
  adam lr=0.1   seeds [1, .3, .2, .1] [.8, .25, .2, .15], seed 2 diverges  final median .15  ← chosen
  sgd  lr=0.1   seeds [3, 2, 1, .45] [3, 2, 1.5, .9], seed 2 fails          final median .9, steps 40/∞/∞
task beta (target 1.0), in a second sweep dir:
  adam lr=0.01  3 × [2, 1.5, 1, .8]    steps 30  ← chosen (lr=0.1 diverged on every seed)
  sgd  lr=0.1   3 × [1.5, .9, .7, .6]  steps 20
Costs per step: adam 0.1 s and 2 passes, sgd 0.05 s and 3 passes.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from omegaconf import OmegaConf

from metaopt.report import build_report
from metaopt.report.__main__ import main
from metaopt.report.analysis import Target, TargetsFile, analyse
from metaopt.report.runs import load_sweeps
from metaopt.train import train

COST = {"adam": (0.1, 2), "sgd": (0.05, 3)}  # seconds and passes per step
TARGETS = {"defaults": {"metric": "val/loss", "mode": "min"},
           "tasks": {"alpha": {"target": 0.5}, "beta": {"metric": "val/loss", "target": 1.0}}}


def fake_run(run_dir, task, optimizer, lr, seed, vals, status="completed", error=None, scheduler=None, meta=None):
    """A run dir as train() and Hydra leave it; ``vals`` are val/loss at steps 10, 20, ... ."""
    run_dir.mkdir(parents=True)
    (run_dir / ".hydra").mkdir()
    config = {"seed": seed, "device": "auto", "trainer": {"steps": 40, "eval_every": 10, "progress": "none"},
              "paths": {"data_dir": "${oc.env:HOME}"}, "task": {"_target_": f"fake.{task.title()}", "dim": 2},
              "optimizer": {"_target_": f"torch.optim.{optimizer.title()}", "_partial_": True, "lr": lr},
              "scheduler": {"_target_": "metaopt.schedules.constant", "_partial_": True}}
    if scheduler is not None:  # as Hydra records a group option: in hydra.yaml's choices
        config["scheduler"] = {"_target_": f"metaopt.schedules.{scheduler[0]}", **scheduler[1]}
        (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
            {"hydra": {"runtime": {"choices": {"task": task, "optimizer": optimizer, "scheduler": scheduler[0]}}}}))
    if meta is not None:
        config["meta"] = {"_target_": "metaopt.outer.OuterTrainer", "steps": 5}
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        [f"task={task}", f"optimizer={optimizer}", f"optimizer.lr={lr}", f"seed={seed}"]
        + ([f"meta={meta}"] if meta is not None else [])))
    dt, passes = COST[optimizer]
    lines = []
    for i, v in enumerate(vals):
        step = 10 * (i + 1)
        record = {"step": step, "time": dt * step, "passes/forward": passes * step // 2,
                  "passes/backward": passes * step - passes * step // 2, "train/loss": v * 1.1, "lr": lr}
        if math.isfinite(v):
            record["val/loss"] = v
        else:
            record["train/loss"] = "inf"  # how runfiles writes a non-finite value
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = {"status": status, "task": config["task"]["_target_"], "optimizer": config["optimizer"]["_target_"],
               "seed": seed, "steps": 10 * len(vals), "optimizer_state_bytes_per_param": 8.0 if optimizer == "adam"
               else 0.0, "step_time_mean": dt}
    if status == "completed":
        summary.update(final={"val/loss": vals[-1], "test/loss": vals[-1] + 0.01}, best={"val/loss": min(vals)},
                       objective=vals[-1])
    elif status == "diverged":
        summary.update(objective="inf", diverged_at=10 * len(vals))
    elif status == "failed":
        summary.update(error=error)
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def fake_sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    first, second = root / "alpha_sweep", root / "beta_sweep"
    inf = math.inf
    jobs = [("alpha", "adam", 0.01, [2, 1, .6, .4], [2, .9, .45, .3], [2, 1.2, .8, .55]),
            ("alpha", "adam", 0.1, [1, .3, .2, .1], [.8, .25, .2, .15], [1.0, inf]),
            ("alpha", "sgd", 0.1, [3, 2, 1, .45], [3, 2, 1.5, .9], [3, 2])]
    num = 0
    for task, opt, lr, *curves in jobs:
        for seed, vals in enumerate(curves):
            status = "diverged" if inf in vals else "failed" if (opt, seed) == ("sgd", 2) else "completed"
            fake_run(first / str(num), task, opt, lr, seed, vals, status, error="RuntimeError: boom")
            num += 1
    # Killed (or still running): no final summary. It must be listed, not counted.
    fake_run(first / str(num), "alpha", "sgd", 0.1, 3, [3], status="running")
    num = 0
    for seed in range(3):
        for opt, lr, vals in (("adam", 0.01, [2, 1.5, 1, .8]), ("adam", 0.1, [1.5, inf]), ("sgd", 0.1, [1.5, .9, .7, .6])):
            fake_run(second / str(num), "beta", opt, lr, seed, vals, "diverged" if inf in vals else "completed")
            num += 1
    targets = root / "targets.yaml"
    targets.write_text(yaml.safe_dump(TARGETS))
    report = build_report([first, second], targets=targets)
    return report, first


def _table(report):
    with open(report.files["table_csv"]) as fh:
        return {(r["task"], r["optimizer"]): r for r in csv.DictReader(fh)}


def test_settings_named_by_what_varies(fake_sweeps):
    report, _ = fake_sweeps
    settings = {(s.task, s.optimizer, s.setting) for s in report.analysis.settings}
    # sgd ran one lr on each task: nothing varies, so it has one unnamed setting.
    assert settings == {("alpha", "adam", "lr=0.01"), ("alpha", "adam", "lr=0.1"), ("alpha", "sgd", ""),
                        ("beta", "adam", "lr=0.01"), ("beta", "adam", "lr=0.1"), ("beta", "sgd", "")}


def test_table_medians_and_choice_on_validation(fake_sweeps):
    report, _ = fake_sweeps
    rows = _table(report)
    adam = rows[("alpha", "adam")]
    assert adam["setting"] == "lr=0.1"  # median final .15 beats .4, despite one diverged seed
    assert float(adam["final_median"]) == pytest.approx(0.15)
    assert float(adam["final_min"]) == pytest.approx(0.1) and adam["final_max"] == "inf"
    assert float(adam["test_median"]) == pytest.approx(0.16)  # .11, .16 and the diverged seed as +inf
    assert float(adam["best_median"]) == pytest.approx(0.15)
    assert float(rows[("beta", "adam")]["final_median"]) == pytest.approx(0.8)
    assert rows[("beta", "adam")]["setting"] == "lr=0.01"
    assert float(adam["state_bytes_per_param"]) == 8.0
    assert float(rows[("alpha", "sgd")]["step_time_mean"]) == pytest.approx(0.05)


def test_time_to_target(fake_sweeps):
    report, _ = fake_sweeps
    rows = _table(report)
    adam = rows[("alpha", "adam")]
    assert float(adam["steps_to_target"]) == 20 and float(adam["time_to_target"]) == pytest.approx(2.0)
    assert float(adam["passes_to_target"]) == 40 and adam["n_reached"] == "2"
    assert rows[("alpha", "sgd")]["steps_to_target"] == "inf"  # 1 of 3 reached: the median did not
    assert rows[("alpha", "sgd")]["n_reached"] == "1"
    assert float(rows[("beta", "sgd")]["steps_to_target"]) == 20
    assert float(rows[("beta", "adam")]["steps_to_target"]) == 30


def test_failures_counted_not_dropped(fake_sweeps):
    report, _ = fake_sweeps
    rows = _table(report)
    assert (rows[("alpha", "adam")]["n_runs"], rows[("alpha", "adam")]["n_diverged"]) == ("3", "1")
    sgd = rows[("alpha", "sgd")]
    assert (sgd["n_runs"], sgd["n_failed"], sgd["final_max"]) == ("3", "1", "inf")
    assert float(sgd["final_median"]) == pytest.approx(0.9)  # .45, .9 and the failure as +inf
    with open(report.files["settings_csv"]) as fh:
        beta_lr01 = next(r for r in csv.DictReader(fh) if r["task"] == "beta" and r["setting"] == "lr=0.1")
    assert (beta_lr01["n_diverged"], beta_lr01["final_median"], beta_lr01["chosen"]) == ("3", "inf", "0")
    page = report.files["markdown"].read_text()
    assert "| alpha | adam | lr=0.1 (best of 2) | 3 | 0.15 [0.1–∞] |" in page
    assert "RuntimeError: boom" in page and "no final summary" in page
    assert "1 unfinished (not counted)" in page


def test_profiles(fake_sweeps):
    report, _ = fake_sweeps
    steps, time, passes = (report.profiles[m] for m in ("steps", "time", "passes"))
    assert steps.tasks == ["alpha", "beta"]
    assert steps.ratios == {"adam": [1.0, 1.5], "sgd": [math.inf, 1.0]}
    assert (steps.rho("adam", 1.0), steps.rho("adam", 1.5), steps.rho("sgd", 100)) == (0.5, 1.0, 0.5)
    assert steps.score("adam") == pytest.approx((3 + 2.5) / 6) and steps.score("sgd") == pytest.approx(0.5)
    assert time.ratios["adam"] == pytest.approx([1.0, 3.0])  # sgd's steps are half the price
    assert time.score("adam") == pytest.approx((3 + 1) / 6)
    assert passes.ratios == {"adam": [1.0, 1.0], "sgd": [math.inf, 1.0]}  # 60 passes each on beta
    with open(report.files["profile_csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert {"measure": "time", "task": "beta", "optimizer": "adam", "to_target": "3.0", "ratio": "3.0"} in rows


def test_files_written(fake_sweeps):
    report, first = fake_sweeps
    assert report.out == first / "report"
    names = {p.name for p in report.out.iterdir()}
    assert {"report.md", "report.html", "table.csv", "settings.csv", "runs.csv", "profile.csv", "profile.png",
            "loss_vs_steps.png", "loss_vs_time.png", "loss_vs_passes.png", "lr_eff.png"} <= names
    for png in report.out.glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    page = report.files["markdown"].read_text()
    assert all(f"]({p.name})" in page for p in report.out.glob("*.png"))
    assert "<table>" in report.files["html"].read_text()


def test_swept_scheduler_is_part_of_the_setting(tmp_path):
    for num, (seed, sched) in enumerate([(0, ("constant", {})), (1, ("constant", {})),
                                         (0, ("warmup_cosine", {"warmup_steps": 10}))]):
        fake_run(tmp_path / str(num), "alpha", "adam", 0.01, seed, [2, 1], scheduler=sched)
    runs = load_sweeps([tmp_path]).runs
    assert [r.setting for r in runs] == ["scheduler=constant"] * 2 + ["scheduler=warmup_cosine "
                                                                       "scheduler.warmup_steps=10"]


def test_missing_jobs_and_auto_target(tmp_path):
    sweep = tmp_path / "sweep"
    for num, seed in ((0, 0), (2, 2)):
        fake_run(sweep / str(num), "alpha", "adam", 0.01, seed, [2, 1, .6, .4])
    # An experiment's grid (sweeper params) with one axis overridden on the command line: 3 × 1 jobs.
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "params": {"seed": "0,1,2", "optimizer.lr": "0.01,0.1"}},
        "overrides": {"task": ["task=alpha", "optimizer.lr=0.01"]}}}))
    loaded = load_sweeps([sweep])
    assert len(loaded.runs) == 2 and "job(s) 1 (of 3 planned)" in loaded.missing[0]
    analysis = analyse(loaded.runs, TargetsFile(auto_slack=0.5))
    assert analysis.targets["alpha"] == Target("val/loss", "min", pytest.approx(0.6), "auto")
    assert analysis.chosen()[0].to_target("steps") == 30


def test_a_choice_at_the_end_of_its_grid_is_flagged(tmp_path):
    for num, (lr, vals) in enumerate([(0.001, [3, 2, 1.5, 1.2]), (0.01, [2, 1, .6, .4]), (0.1, [1, .3, .2, .1])]):
        fake_run(tmp_path / str(num), "alpha", "adam", lr, 0, vals)
    for num, (lr, vals) in enumerate([(0.001, [3, 2, 1.5, 1.2]), (0.01, [1, .3, .2, .1]), (0.1, [2, 1, .6, .4])]):
        fake_run(tmp_path / str(10 + num), "alpha", "sgd", lr, 0, vals)
    analysis = analyse(load_sweeps([tmp_path]).runs, TargetsFile(tasks={"alpha": {"target": 0.5}}))
    chosen = {s.optimizer: s for s in analysis.chosen()}
    assert chosen["adam"].edges == {"optimizer.lr": "highest"} and chosen["sgd"].edges == {}
    assert any(n.startswith("alpha / adam: the chosen optimizer.lr=0.1 is the highest of its grid (0.001 … 0.1)")
               for n in analysis.notes)
    build_report([tmp_path], tmp_path / "report", html=False)
    assert "— grid edge: highest lr" in (tmp_path / "report" / "report.md").read_text()


def test_a_job_the_manifest_settled_as_failed_is_failed_in_the_report(tmp_path):
    # scancel'd mid-run: summary.json still says running; the sweep's manifest knows better.
    fake_run(tmp_path / "0", "alpha", "adam", 0.01, 0, [2, 1, .6, .4])
    fake_run(tmp_path / "1", "alpha", "adam", 0.01, 1, [2, 1], status="running")
    reason = "the job ended in SLURM state CANCELLED by 0 without writing a result"
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {}}}))  # as Hydra leaves it
    (tmp_path / "manifest.json").write_text(json.dumps({"jobs": [
        {"num": 0, "run_dir": str(tmp_path / "0"), "status": "completed"},
        {"num": 1, "run_dir": str(tmp_path / "1"), "status": "failed", "error": reason}]}))
    runs = {r.dir.name: r for r in load_sweeps([tmp_path]).runs}
    assert runs["0"].status == "completed"
    assert runs["1"].status == "failed" and runs["1"].error == reason and not runs["1"].problems


def test_meta_training_runs_are_not_judged_by_the_task_target(tmp_path):
    # A meta-training run's val/loss is a held-out normalised loss: not comparable with the task's.
    fake_run(tmp_path / "0", "alpha", "adam", 0.01, 0, [2, 1, .6, .4])
    fake_run(tmp_path / "1", "alpha", "adam", 0.01, 0, [.9, .8, .7, .6], meta="pes")
    runs = load_sweeps([tmp_path]).runs
    assert sorted(r.task_name for r in runs) == ["alpha", "alpha_meta-pes"]
    analysis = analyse(runs, TargetsFile(tasks={"alpha": {"target": 0.5}}))
    assert analysis.targets["alpha"].value == 0.5 and analysis.targets["alpha_meta-pes"].value != 0.5


def test_cli_on_real_runs(make_cfg, tmp_path, capsys):
    """Two tiny real runs laid out as a sweep (job dirs with .hydra/ as Hydra writes them)."""
    sweep = tmp_path / "multirun"
    for num, lr in enumerate(("1e-4", "5e-4")):
        overrides = ["task=rosenbrock", "optimizer=sgd", f"optimizer.lr={lr}"]
        cfg = make_cfg(*overrides)
        run_dir = sweep / str(num)
        train(cfg, run_dir=run_dir)
        (run_dir / ".hydra").mkdir()
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
            {"hydra": {"runtime": {"choices": {"task": "rosenbrock", "optimizer": "sgd", "scheduler": "constant"}}}}))
    assert main([str(sweep), "--out", str(tmp_path / "out"), "--no-html"]) == 0
    assert "2 runs: 2 completed" in capsys.readouterr().out
    with open(tmp_path / "out" / "settings.csv") as fh:
        rows = list(csv.DictReader(fh))
    finals = {r["setting"]: float(r["final_median"]) for r in rows}
    assert set(finals) == {"lr=0.0001", "lr=0.0005"}
    summaries = [json.loads((sweep / str(n) / "summary.json").read_text()) for n in (0, 1)]
    assert sorted(finals.values()) == pytest.approx(sorted(s["objective"] for s in summaries))
    chosen = next(r for r in rows if r["chosen"] == "1")
    assert float(chosen["final_median"]) == min(finals.values())
    assert float(chosen["state_bytes_per_param"]) == 0.0  # plain SGD keeps no state
    assert (tmp_path / "out" / "lr_eff.png").exists() and not (tmp_path / "out" / "report.html").exists()


def test_cli_without_runs(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no run directories" in capsys.readouterr().err


def test_cli_with_a_path_that_does_not_exist_says_so(tmp_path, capsys):
    assert main([str(tmp_path / "typo")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{tmp_path / 'typo'}: no such directory")


def test_wandb_failure_is_a_warning(fake_sweeps, monkeypatch):
    import sys

    from metaopt.report import log_to_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.warns(RuntimeWarning, match="W&B logging of the report failed"):
        assert log_to_wandb(fake_sweeps[0]) is None


def test_overview_marks_best_reached_and_failures(fake_sweeps):
    from metaopt.report.render import overview

    report, _ = fake_sweeps
    headers, rows = overview(report.analysis)
    assert headers == ["optimizer", "alpha", "beta"]
    by_opt = {r[0]: dict(zip(headers[1:], r[1:])) for r in rows}
    assert by_opt["adam"]["alpha"] == "**0.15** ✓ (1/3 failed)"  # best, median seed reached, one diverged
    assert by_opt["sgd"]["alpha"] == "0.9 (1/3 failed)"  # its median seed never reached the target
    assert "## Overview" in report.files["markdown"].read_text()
