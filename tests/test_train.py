"""The training loop: the files a run leaves, reproducibility, resume, divergence, bad input."""

from __future__ import annotations

import json
import math
import signal
import warnings

import pytest
import torch

import metaopt.train as train_module
from metaopt.errors import ConfigError, DataNotFoundError
from metaopt.loggers import WandbLogger
from metaopt.train import train

TIMING_KEYS = {"time"}


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_leaves_plain_files(make_cfg, tmp_path):
    value = train(make_cfg("task=two_moons"), run_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert summary["status"] == "completed"
    assert value == pytest.approx(summary["final"]["val/loss"]) == summary["objective"]
    assert {"test/loss", "test/accuracy", "val/accuracy"} <= set(summary["final"])
    assert summary["steps"] == 20 and summary["passes"] == {"forward": 20, "backward": 20}
    assert summary["optimizer_state_bytes"] > 0 and summary["num_params"] > 0
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    # The mean step time leaves out the steps before the first record (warm-up).
    assert summary["step_time_mean"] == pytest.approx((records[-1]["time"] - records[0]["time"]) / 15)
    assert "val/loss" in records[1] and "val/loss" not in records[0]
    assert all(math.isfinite(r["train/loss"]) for r in records)
    assert (tmp_path / "checkpoint.pt").exists()
    torch.load(tmp_path / "checkpoint.pt", weights_only=True)


def test_same_seed_gives_identical_metrics(make_cfg, tmp_path):
    cfg = make_cfg("task=mnist1d", "trainer.steps=30")
    train(cfg, run_dir=tmp_path / "a")
    train(cfg, run_dir=tmp_path / "b")
    a, b = (without_timing(read_jsonl(tmp_path / d / "metrics.jsonl")) for d in "ab")
    assert a == b
    other = make_cfg("task=mnist1d", "trainer.steps=30", "seed=1")
    train(other, run_dir=tmp_path / "c")
    assert without_timing(read_jsonl(tmp_path / "c" / "metrics.jsonl")) != a


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("task", ["mnist1d", "quadratic"])
def test_interrupted_then_resumed_equals_uninterrupted(make_cfg, tmp_path, monkeypatch, task, resumed_from):
    overrides = (f"task={task}", "trainer.steps=30", "trainer.checkpoint_every=10", "trainer.log_every=3",
                 "scheduler=cosine")
    cfg = make_cfg(*overrides)
    train(cfg, run_dir=tmp_path / "full")

    real_update = train_module.Progress.update

    def interrupt_at_step_17(self, step, metrics):
        real_update(self, step, metrics)
        if step >= 17:
            raise Interrupt

    monkeypatch.setattr(train_module.Progress, "update", interrupt_at_step_17)
    with pytest.raises(Interrupt):
        train(make_cfg(*overrides), run_dir=tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"] == "failed"
    assert max(r["step"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")) >= 17
    monkeypatch.setattr(train_module.Progress, "update", real_update)
    value = train(make_cfg(*overrides), run_dir=tmp_path / "cut")
    assert resumed_from() == [10]  # the last periodic checkpoint before step 17

    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    cut = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert cut["status"] == "completed" and value == full["objective"]
    assert cut["final"] == full["final"] and cut["passes"] == full["passes"]
    assert without_timing(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == \
        without_timing(read_jsonl(tmp_path / "full" / "metrics.jsonl"))


@pytest.mark.parametrize("signals", [["SIGINT"], ["SIGINT", "SIGINT"], ["SIGTERM"]])
def test_ctrl_c_checkpoints_at_the_next_step_and_the_rerun_resumes(make_cfg, tmp_path, monkeypatch, signals,
                                                                   default_signals, resumed_from):
    overrides = ("task=quadratic", "trainer.steps=30", "trainer.checkpoint_every=10", "trainer.log_every=3",
                 "scheduler=cosine")
    train(make_cfg(*overrides), run_dir=tmp_path / "full")
    real_update = train_module.Progress.update
    pressed = []

    def ctrl_c_at_step_15(self, step, metrics):
        real_update(self, step, metrics)
        if step >= 15 and not pressed:
            pressed.append(step)
            for name in signals:
                signal.raise_signal(getattr(signal, name))

    monkeypatch.setattr(train_module.Progress, "update", ctrl_c_at_step_15)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(*overrides), run_dir=tmp_path / "cut")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    presses = len(signals)
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    checkpoint = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert summary["status"] == "interrupted"
    # One press: the loop finishes step 16 and checkpoints there. Two: it stops at once, and the
    # last periodic checkpoint (step 10) is what a rerun resumes from.
    assert checkpoint["loop"]["step"] == (16 if presses == 1 else 10)
    if presses == 1:
        assert summary["steps"] == 16 and "step 16" in summary["error"]
        assert ("Ctrl-C" if signals == ["SIGINT"] else "SIGTERM") in summary["error"]
    monkeypatch.setattr(train_module.Progress, "update", real_update)
    value = train(make_cfg(*overrides), run_dir=tmp_path / "cut")
    assert resumed_from() == [16 if presses == 1 else 10]
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert value == full["objective"]
    assert without_timing(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == \
        without_timing(read_jsonl(tmp_path / "full" / "metrics.jsonl"))


def test_ctrl_c_during_the_last_step_completes_the_run_and_stops(make_cfg, tmp_path, monkeypatch, default_signals):
    real_update = train_module.Progress.update

    def ctrl_c_at_the_end(self, step, metrics):
        real_update(self, step, metrics)
        if step == 20:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train_module.Progress, "update", ctrl_c_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg("task=rosenbrock", "trainer.steps=20"), run_dir=tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"


def test_rerun_of_completed_run_returns_its_result(make_cfg, tmp_path):
    cfg = make_cfg("task=rosenbrock")
    first = train(cfg, run_dir=tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    assert train(cfg, run_dir=tmp_path) == first
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_rerun_of_completed_run_with_other_steps_is_refused(make_cfg, tmp_path):
    train(make_cfg("task=rosenbrock", "trainer.steps=20"), run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^trainer.steps: .* finished for 20 steps, not 40"):
        train(make_cfg("task=rosenbrock", "trainer.steps=40"), run_dir=tmp_path)


def test_a_dir_holding_another_configs_run_is_refused_and_left_as_it_was(make_cfg, tmp_path):
    train(make_cfg("task=rosenbrock", "trainer.steps=20"), run_dir=tmp_path)
    before = (tmp_path / "summary.json").read_text()
    with pytest.raises(ConfigError, match="different config"):
        train(make_cfg("task=rosenbrock", "trainer.steps=20", "optimizer=sgd"), run_dir=tmp_path)
    assert (tmp_path / "summary.json").read_text() == before  # the completed result is not overwritten


def test_a_dir_held_by_a_live_run_is_refused_before_anything_is_written(make_cfg, tmp_path):
    """Two runs in one dir (e.g. started in the same second) would interleave metrics.jsonl and
    overwrite each other's summary: the second is refused while the first holds the dir's lock."""
    import subprocess
    import sys

    from metaopt.errors import RunDirInUse

    (tmp_path / "summary.json").write_text('{"status": "running"}\n')
    holder = subprocess.Popen([sys.executable, "-c",  # another process, as a real second run would be
                               "import sys; from metaopt.runfiles import RunFiles; f = RunFiles(sys.argv[1]); "
                               "f.lock(); print('held', flush=True); sys.stdin.read()", str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match=r"^hydra.run.dir: .* is in use by another run \(pid \d+ on "):
            train(make_cfg("task=rosenbrock"), run_dir=tmp_path)
        assert (tmp_path / "summary.json").read_text() == '{"status": "running"}\n'
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.communicate("", timeout=30)
    # The lock goes with its process: the dir is usable again.
    assert math.isfinite(train(make_cfg("task=rosenbrock"), run_dir=tmp_path))


def test_a_run_that_failed_on_its_config_can_be_rerun_in_its_dir_once_fixed(make_cfg, tmp_path):
    with pytest.raises(ConfigError):
        train(make_cfg("task=rosenbrock", "trainer.steps=20", "optimizer.lr=-1"), run_dir=tmp_path)
    assert math.isfinite(train(make_cfg("task=rosenbrock", "trainer.steps=20"), run_dir=tmp_path))


def test_shipped_weights_enter_the_fingerprint_by_name(make_cfg, monkeypatch):
    # The same run from another checkout: the ${pretrained:...} path differs, the run does not.
    cfg = make_cfg("optimizer=learned_rnn_linreg")
    here = train_module.fingerprint(cfg)
    elsewhere = "/elsewhere/site-packages/metaopt/pretrained/"
    monkeypatch.setattr(train_module, "_SHIPPED", elsewhere)
    cfg.optimizer.checkpoint = elsewhere + "gru_linreg.pt"
    assert train_module.fingerprint(cfg) == here
    cfg.optimizer.checkpoint = "/my/own/lopt.pt"
    assert train_module.fingerprint(cfg) != here


def test_checkpoint_of_another_config_is_not_resumed(make_cfg, tmp_path):
    train(make_cfg("task=rosenbrock", "trainer.steps=20"), run_dir=tmp_path)
    (tmp_path / "summary.json").unlink()
    with pytest.raises(ConfigError, match="different config"):
        train(make_cfg("task=rosenbrock", "optimizer=sgd"), run_dir=tmp_path)


def test_divergence_stops_marks_run_and_keeps_metrics(make_cfg, tmp_path):
    cfg = make_cfg("task=rosenbrock", "optimizer=sgd", "optimizer.lr=10", "trainer.steps=200")
    value = train(cfg, run_dir=tmp_path)
    before = (tmp_path / "summary.json").read_text()

    def no_training(cfg):
        raise AssertionError("a diverged run's rerun must return its recorded result, not train again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "build", no_training)
        assert train(cfg, run_dir=tmp_path) == math.inf  # a resumed sweep returns the recorded result
    assert (tmp_path / "summary.json").read_text() == before
    summary = json.loads((tmp_path / "summary.json").read_text())
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert value == math.inf
    assert summary["status"] == "diverged" and summary["objective"] == "inf"
    assert summary["steps"] < 200 and summary["diverged_at"] == records[-1]["step"]
    assert len(records) >= 1


def test_closure_optimizer_passes_are_counted(make_cfg, tmp_path):
    train(make_cfg("task=linreg", "optimizer=lbfgs"), run_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["passes"]["forward"] > summary["steps"]
    assert summary["passes"]["forward"] == summary["passes"]["backward"]


def test_optimizer_diagnostics_are_logged(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.optim.Adam, "diagnostics", lambda self: {"lr_eff": torch.tensor(0.5)},
                        raising=False)
    train(make_cfg("task=rosenbrock"), run_dir=tmp_path)
    assert all(r["opt/lr_eff"] == 0.5 for r in read_jsonl(tmp_path / "metrics.jsonl"))


@pytest.mark.parametrize("override,key", [
    ("optimizer.lr=-0.1", "optimizer.lr"),
    ("trainer.steps=0", "trainer.steps"),
    ("trainer.eval_every=-5", "trainer.eval_every"),
    ("task.batch_size=0", "task.batch_size"),
    ("seed=-1", "seed"),
    ("trainer.progress=fancy", "trainer.progress"),
    ("trainer.threads=0", "trainer.threads"),
    ("optimizer.betas=[1.5,0.9]", "optimizer"),
    ("task.hidden=[0]", "task"),
])
def test_invalid_values_fail_before_training_with_one_line_naming_the_key(make_cfg, tmp_path, override, key):
    with pytest.raises(ConfigError) as info:
        train(make_cfg("task=two_moons", override), run_dir=tmp_path)
    message = str(info.value)
    assert message.startswith(key) and "\n" not in message
    assert not (tmp_path / "metrics.jsonl").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("device", ["tpu", "cuda:7", "banana"])
def test_unknown_or_absent_device_is_rejected(make_cfg, tmp_path, device):
    cfg = make_cfg("task=rosenbrock")
    cfg.device = device
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("machine has that device")
    with pytest.raises(ConfigError, match=r"^device: "):
        train(cfg, run_dir=tmp_path)


def test_missing_cifar_offline_is_one_line_naming_the_directory(make_cfg, tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        train(make_cfg("task=resnet", f"task.data_dir={tmp_path / 'nowhere'}"), run_dir=tmp_path / "run")
    assert "\n" not in str(info.value) and str(tmp_path / "nowhere") in str(info.value)


def test_scheduler_needing_lr_on_optimizer_without_lr_is_rejected(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg("task=rosenbrock", "scheduler=cosine")
    real = train_module.instantiate

    def no_lr_optimizer(node, *args, **kwargs):
        obj = real(node, *args, **kwargs)
        if node.get("_target_") == "torch.optim.Adam":
            def make(params):
                opt = obj(params)
                for group in opt.param_groups:
                    del group["lr"]
                return opt
            return make
        return obj

    monkeypatch.setattr(train_module, "instantiate", no_lr_optimizer)
    with pytest.raises(ConfigError, match=r"^scheduler .*no 'lr'"):
        train(cfg, run_dir=tmp_path)


def test_wandb_offline_run_lands_in_run_dir(make_cfg, tmp_path):
    value = train(make_cfg("task=rosenbrock", "logger=wandb", "logger.mode=offline"), run_dir=tmp_path)
    assert math.isfinite(value)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    run_id = (tmp_path / "run_id.txt").read_text().strip()
    assert runs[0].name.endswith(run_id)


def test_failing_logger_warns_once_and_training_continues(make_cfg, tmp_path, caplog, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("wandb is broken")

    monkeypatch.setattr(wandb, "init", broken_init)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one log line, not a Python warning on top of it
        value = train(make_cfg("task=rosenbrock", "logger=wandb"), run_dir=tmp_path)
    assert math.isfinite(value)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
    assert len([r for r in caplog.records if "continuing without this logger" in r.message]) == 1


def test_a_value_of_the_wrong_type_points_at_the_groups_values(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"^optimizer \(torch.optim.Adam\): .*subscriptable \(a value of the "
                                          r"wrong type among optimizer\.\*\?\)$"):
        train(make_cfg("task=rosenbrock", "optimizer.betas=0.9"), run_dir=tmp_path)


def test_a_misspelled_logger_mode_is_a_config_error_naming_the_modes(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"^logger.mode: 'ofline' is not one of offline, online, disabled"):
        train(make_cfg("task=rosenbrock", "logger=wandb", "logger.mode=ofline"), run_dir=tmp_path)


@pytest.mark.parametrize("env,expected", [(None, "offline"), ("disabled", "disabled"), ("dryrun", "offline")])
def test_logger_mode_defaults_to_wandb_mode_then_offline(make_cfg, monkeypatch, env, expected):
    from hydra.utils import instantiate

    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    assert instantiate(make_cfg("logger=wandb").logger).mode == expected
    monkeypatch.setenv("WANDB_MODE", "online")
    assert instantiate(make_cfg("logger=wandb", "logger.mode=offline").logger).mode == "offline"


def test_a_requeue_during_a_logger_call_is_not_swallowed():
    from metaopt.loggers import Logger, SafeLogger
    from metaopt.preemption import Requeued

    class Slow(Logger):
        def log(self, metrics, step):
            raise Requeued(0)  # SLURM's signal handled while W&B was busy

    with pytest.raises(Requeued):
        SafeLogger(Slow()).log({}, 1)


def test_logger_that_exits_does_not_end_training(make_cfg, tmp_path, monkeypatch):
    def exits(self, metrics, step):
        raise SystemExit(1)

    monkeypatch.setattr(WandbLogger, "log", exits)
    value = train(make_cfg("task=rosenbrock", "logger=wandb"), run_dir=tmp_path)
    assert math.isfinite(value)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"


def test_train_outside_hydra_needs_a_run_dir(make_cfg):
    with pytest.raises(ValueError, match="run_dir"):
        train(make_cfg("task=rosenbrock"))


class RecordingCallback(train_module.Callback):
    def __init__(self):
        self.events = []

    def on_start(self, c, run_dir):
        self.events.append("start")

    def before_step(self, step, batch, c):
        self.events.append(("before", step))

    def after_step(self, step, batch, c):
        self.events.append(("after", step))
        return {"analysis/probe": float(step)} if step % 7 == 0 else None

    def on_end(self, c, run_dir):
        self.events.append("end")


def test_analysis_callback_runs_around_each_step_and_its_metrics_are_logged(make_cfg, tmp_path, monkeypatch):
    callback = RecordingCallback()
    real_build = train_module._build
    monkeypatch.setattr(train_module, "_build",
                        lambda node, key, **kw: callback if key == "analysis" else real_build(node, key, **kw))
    cfg = make_cfg("task=rosenbrock")
    from omegaconf import open_dict
    with open_dict(cfg):
        cfg.analysis = {"_target_": "unused"}
    train(cfg, run_dir=tmp_path)
    assert callback.events[0] == "start" and callback.events[-1] == "end"
    assert callback.events[1:3] == [("before", 0), ("after", 0)] and len(callback.events) == 2 + 2 * 20
    probes = {r["step"]: r["analysis/probe"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "analysis/probe" in r}
    assert probes == {5: 0.0, 10: 7.0, 15: 14.0}


def test_meta_settings_without_an_outer_trainer_are_a_config_error(make_cfg, tmp_path):
    cfg = make_cfg("task=rosenbrock", "+meta.steps=3")
    with pytest.raises(ConfigError, match="^meta: "):
        train(cfg, run_dir=tmp_path)
