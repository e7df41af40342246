"""``python -m metaopt`` as a user runs it: in a subprocess, with Hydra parsing the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from metaopt.cli_check import options
from tests.conftest import sigint_as_on_a_terminal

TINY = ["trainer.steps=20", "trainer.eval_every=10", "trainer.log_every=5", "trainer.checkpoint_every=10"]


def metaopt(*args: str, cwd: Path, data_dir: str, python: str = sys.executable, timeout: int = 300):
    env = {**os.environ, "WANDB_MODE": "offline", "METAOPT_DATA_DIR": data_dir}
    env.pop("WANDB_SERVICE", None)
    return subprocess.run([python, "-m", "metaopt", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_single_run_prints_where_results_are(tmp_path, data_dir):
    proc = metaopt("task=two_moons", *TINY, cwd=tmp_path, data_dir=data_dir)
    assert proc.returncode == 0, proc.stderr
    runs = list((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(runs) == 1
    run = runs[0]
    assert f"results in {run.resolve()}" in proc.stdout + proc.stderr or f"results in {run}" in proc.stdout + proc.stderr
    for name in ("metrics.jsonl", "summary.json", "checkpoint.pt", ".hydra/config.yaml", "metaopt.log"):
        assert (run / name).exists(), name
    assert list((run / "wandb").glob("offline-run-*"))


def test_unknown_group_option_lists_the_choices(tmp_path, data_dir):
    proc = metaopt("-m", "optimizer=adam,adamm", cwd=tmp_path, data_dir=data_dir)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"metaopt: error: optimizer: no option 'adamm' (did you mean 'adam'?); options: {', '.join(options('optimizer'))}"]
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("override,key", [("optimizer.lr=-1", "optimizer.lr"), ("device=tpu", "device"),
                                          ("trainer.steps=0", "trainer.steps")])
def test_bad_value_is_one_line_naming_the_key(tmp_path, data_dir, override, key):
    proc = metaopt("task=rosenbrock", override, cwd=tmp_path, data_dir=data_dir)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("metaopt: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"metaopt: error: {key}")
    assert "Traceback" not in proc.stderr
    assert key not in proc.stdout  # once on the terminal; the run's metaopt.log keeps it too


def test_resnet_without_data_offline_names_the_directory(tmp_path, data_dir):
    proc = metaopt("task=resnet", f"task.data_dir={tmp_path / 'cifar'}", cwd=tmp_path, data_dir=data_dir)
    assert proc.returncode == 2
    assert str(tmp_path / "cifar") in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_multirun_jobs_get_their_own_dirs_and_share_a_wandb_group(tmp_path, data_dir):
    proc = metaopt("-m", "task=rosenbrock", "optimizer=adam,sgd", "optimizer.lr=0.001", *TINY,
                   cwd=tmp_path, data_dir=data_dir)
    assert proc.returncode == 0, proc.stderr
    jobs = sorted((tmp_path / "outputs" / "multirun").glob("*/*/*/summary.json"))
    assert [p.parent.name for p in jobs] == ["0", "1"]
    assert all(json.loads(p.read_text())["status"] == "completed" for p in jobs)
    sweep = jobs[0].parent.parent
    group = f"{sweep.parent.name}_{sweep.name}".encode()
    for job in jobs:
        (record,) = job.parent.glob("wandb/offline-run-*/*.wandb")
        assert group in record.read_bytes()  # the run record carries the shared group


@pytest.mark.slow
def test_multirun_goes_on_past_a_diverged_and_a_failed_job(tmp_path, data_dir):
    proc = metaopt("-m", "task=rosenbrock", "optimizer=sgd", "optimizer.lr=10,-1,0.001", "logger=none", *TINY,
                   cwd=tmp_path, data_dir=data_dir)
    statuses = {p.parent.name: json.loads(p.read_text())["status"]
                for p in (tmp_path / "outputs" / "multirun").glob("*/*/*/summary.json")}
    assert statuses == {"0": "diverged", "1": "failed", "2": "completed"}, proc.stderr
    # Every job ran; the failed one is listed at the end and sets the exit status, without a traceback.
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("metaopt: 1 of 3 jobs failed; see ")
    assert "job 1 (task=rosenbrock optimizer=sgd optimizer.lr=-1" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_crashing_job_is_listed_with_its_traceback_in_its_log_and_the_sweep_goes_on(tmp_path, data_dir):
    (tmp_path / "crashing.py").write_text(  # `python -m` puts the working directory on sys.path
        "import torch\n\nclass SGD(torch.optim.SGD):\n    def step(self, closure=None):\n"
        "        raise RuntimeError('a bug in step')\n")
    proc = metaopt("-m", "task=rosenbrock", "optimizer=sgd", "optimizer.lr=0.001",
                   "optimizer._target_=crashing.SGD,torch.optim.SGD", "logger=none", *TINY,
                   cwd=tmp_path, data_dir=data_dir)
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    statuses = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert {k: v["status"] for k, v in statuses.items()} == {"0": "failed", "1": "completed"}, proc.stderr
    assert statuses["0"]["error"] == "RuntimeError: a bug in step"
    assert "RuntimeError: a bug in step" in (sweep / "0" / "metaopt.log").read_text().split("Traceback", 1)[1]
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert [j["status"] for j in manifest["jobs"]] == ["failed", "completed"]
    assert proc.returncode == 1
    listed = "job 0 (task=rosenbrock optimizer=sgd optimizer.lr=0.001 optimizer._target_=crashing.SGD"
    assert listed in proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1] == f"metaopt: 1 of 2 jobs failed; see {sweep.resolve()}/manifest.json"


def test_ctrl_c_in_a_sweep_checkpoints_and_records_the_job_as_interrupted(tmp_path, data_dir):
    env = {**os.environ, "WANDB_MODE": "offline", "METAOPT_DATA_DIR": data_dir}
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "metaopt", "-m", "task=quadratic", "optimizer=adam,sgd",
                             "trainer.steps=10000000", "trainer.checkpoint_every=10000000", "logger=none",
                             f"hydra.sweep.dir={sweep}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_on_a_terminal)
    try:
        for line in proc.stdout:
            if "step " in line and "/10000000" in line:  # the loop is running: a progress line
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["metaopt: interrupted"]
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] > 0
    assert f"hydra.sweep.dir={sweep}" in out
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert [job["status"] for job in manifest["jobs"]] == ["interrupted", "pending"]
    assert (sweep / "0" / "checkpoint.pt").exists() and not (sweep / "1").exists()


def test_a_slurm_sweep_without_a_cluster_is_one_line_and_writes_nothing(tmp_path, data_dir):
    """submitit's sbatch failure was a 40-line traceback and left every job 'pending' in a manifest."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text("#!/bin/sh\necho 'sinfo: fatal: Could not establish a configuration source' >&2\n"
                                   "exit 1\n")
    (bin_dir / "sinfo").chmod(0o755)
    env = {**os.environ, "WANDB_MODE": "offline", "METAOPT_DATA_DIR": data_dir,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "metaopt", "-m", "hydra/launcher=slurm", "optimizer=adam,sgd",
                           f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "metaopt: error: hydra/launcher=slurm: no SLURM cluster answers here (sinfo: fatal: Could not establish a "
        "configuration source); start one (launch/slurm-up.sh on a single machine) or run the sweep with "
        "hydra/launcher=local"]
    assert not sweep.exists()
