"""Sweeps on a real SLURM scheduler: a one-node cluster brought up by ``launch/slurm-up.sh``.

Needs the Debian packages ``slurmctld slurmd slurm-client munge slurmdbd mariadb-server`` (.ci/run
installs them); skipped where they are absent. The requeue test dominates the time: SLURM acts on
time limits on a 30 s tick, so a job with a one-minute limit is signalled 25-55 s after it starts.
It runs in the background while the other tests use the cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metaopt import preemption
from metaopt.train import Callback, train

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
DAEMONS = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sacct", "squeue", "scontrol")
TINY = ["trainer.steps=20", "trainer.eval_every=10", "trainer.log_every=5", "trainer.checkpoint_every=10"]
# Resources that fit the test node; the node offers 4 CPUs on a 2-core machine because the
# requeue job mostly sleeps.
ON_TEST_NODE = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]
# The requeue run: a 1 min limit, SLURM's signal 5 s before it. slurmctld checks limits every
# 30 s and signals at the first check within signal_delay_s + 30 s of the limit: 25-55 s after
# the start, long after submitit's handler is in place (~1-2 s). The first attempt is paced to
# last 56 s, so it is always signalled before it can finish. A requeue happens at a check and the
# job starts again ~12 s later (cred_expire + 1 s), so the next check finds it 18 s in, too early
# to signal; the requeued attempt runs unpaced and finishes long before the check after that.
REQUEUE_RUN = ["task=quadratic", "seed=3", "trainer.steps=4000", "trainer.eval_every=500",
               "trainer.log_every=100", "trainer.checkpoint_every=1000", "scheduler=cosine"]
PACE = "++analysis={_target_:test_slurm.Probe,first_attempt_step_s:0.014}"


class Probe(Callback):
    """Test-only analysis hook that runs inside the jobs (importable there via PYTHONPATH).

    It records whether ``WANDB_SERVICE`` reached the job (it is built before the W&B logger, which
    would drop the variable itself), and can stretch each step of a job's first attempt to
    ``first_attempt_step_s`` by sleeping, so that the attempt outlasts SLURM's signal whatever the
    machine's speed. Sleeping leaves the trajectory unchanged.
    """

    def __init__(self, first_attempt_step_s: float = 0.0):
        self.wandb_service = os.environ.get("WANDB_SERVICE")
        self.restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        self.step_s = first_attempt_step_s if self.restarts == 0 else 0.0
        self.last = time.perf_counter()

    def on_start(self, c, run_dir: Path) -> None:
        self.last = time.perf_counter()
        with open(run_dir / "probe.jsonl", "a") as fh:
            fh.write(json.dumps({"wandb_service": self.wandb_service, "restarts": self.restarts}) + "\n")

    def after_step(self, step, batch, c):
        if self.step_s:
            time.sleep(max(0.0, self.last + self.step_s - time.perf_counter()))
            self.last = time.perf_counter()


def _missing_packages() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [tool for tool in DAEMONS + CLIENTS if shutil.which(tool, path=path) is None]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> dict[str, str]:
    """A running one-node cluster for the session; the environment that talks to it."""
    missing = _missing_packages()
    if missing:
        pytest.skip(f"SLURM is not installed (no {', '.join(missing)}): apt-get install slurmctld slurmd "
                    "slurm-client munge slurmdbd mariadb-server")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_UP_CPUS": "4", "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    start = time.perf_counter()
    up = subprocess.run([str(ROOT / "launch" / "slurm-up.sh"), str(state)], env=env, capture_output=True,
                        text=True, timeout=180)
    if up.returncode != 0:
        subprocess.run([str(ROOT / "launch" / "slurm-down.sh"), str(state)], capture_output=True, timeout=60)
        pytest.fail(f"launch/slurm-up.sh failed:\n{up.stdout}{up.stderr}")
    print(f"\ncluster up in {time.perf_counter() - start:.1f}s")
    env["SLURM_CONF"] = str(state / "etc" / "slurm.conf")
    yield env
    down = subprocess.run([str(ROOT / "launch" / "slurm-down.sh"), str(state)], capture_output=True, text=True,
                          timeout=120)
    assert down.returncode == 0, down.stderr


def _sweep_env(slurm: dict[str, str], data_dir: str, **extra: str) -> dict[str, str]:
    env = {**slurm, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "METAOPT_DATA_DIR": data_dir,
           # one thread in the jobs and in this process: bitwise-equal runs, no oversubscription
           "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    env.pop("WANDB_SERVICE", None)
    return {**env, **extra}


def _start_sweep(*overrides: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / "sweep.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "metaopt", "-m", *ON_TEST_NODE, *overrides], cwd=cwd,
                                env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, cwd: Path, timeout: float) -> tuple[int, str, Path]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"sweep did not finish within {timeout}s:\n{(cwd / 'sweep.log').read_text()[-4000:]}")
    (sweep_dir,) = (cwd / "outputs" / "multirun").glob("*/*")
    return proc.returncode, (cwd / "sweep.log").read_text(), sweep_dir


def _manifest(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "manifest.json").read_text())


def _sacct(slurm: dict[str, str], *args: str) -> list[list[str]]:
    out = subprocess.run(["sacct", "-n", "-P", "-X", *args], env=slurm, capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return [line.split("|") for line in out.splitlines() if line]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


@pytest.fixture(scope="module")
def requeue_sweep(slurm, data_dir, tmp_path_factory):
    """The time-limit run, started first so that it waits out SLURM's signal while other tests run."""
    cwd = tmp_path_factory.mktemp("requeue")
    env = _sweep_env(slurm, data_dir)
    start = time.perf_counter()
    proc = _start_sweep(*REQUEUE_RUN, PACE, "logger=wandb", "hydra.launcher.timeout_min=1",
                        "hydra.launcher.signal_delay_s=5", cwd=cwd, env=env)
    yield proc, cwd, start
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.slurm
@pytest.mark.usefixtures("requeue_sweep")
def test_sweep_is_one_job_array_with_its_own_run_dirs_manifest_and_wandb_runs(slurm, data_dir, tmp_path):
    # A W&B service address left by the shell that submits must not reach the jobs.
    env = _sweep_env(slurm, data_dir, WANDB_SERVICE="2-999999-tcp-localhost-1")
    start = time.perf_counter()
    proc = _start_sweep("task=rosenbrock", "optimizer=adam,sgd", "seed=0,1", "optimizer.lr=0.001", *TINY,
                        "logger=wandb", "++analysis={_target_:test_slurm.Probe}", cwd=tmp_path, env=env)
    rc, log, sweep_dir = _finish(proc, tmp_path, timeout=150)
    print(f"\n4-job sweep: {time.perf_counter() - start:.1f}s end to end")
    assert rc == 0, log[-4000:]

    manifest = _manifest(sweep_dir)
    jobs = manifest["jobs"]
    assert manifest["counts"] == {"completed": 4}
    assert [job["num"] for job in jobs] == [0, 1, 2, 3]
    arrays = {job["slurm_job_id"].split("_")[0] for job in jobs}
    assert len(arrays) == 1, jobs  # one sbatch: one array, one task per sweep point
    assert sorted(job["slurm_job_id"].split("_")[1] for job in jobs) == ["0", "1", "2", "3"]
    (array,) = arrays
    assert len(_sacct(slurm, "-j", array, "-o", "JobID,State")) == 4
    # Listed as pending from the moment of submission, numbered as the jobs number themselves.
    planned = json.loads((sweep_dir / ".manifest" / "sweep.json").read_text())["planned"]
    assert [p["overrides"] for p in planned] == [job["overrides"] for job in jobs]
    points = {(o[1], o[2]) for o in (job["overrides"] for job in jobs)}
    assert points == {("optimizer=adam", "seed=0"), ("optimizer=adam", "seed=1"),
                      ("optimizer=sgd", "seed=0"), ("optimizer=sgd", "seed=1")}

    for job in jobs:
        run_dir = Path(job["run_dir"])
        assert run_dir == sweep_dir / str(job["num"])
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and job["objective"] == summary["objective"]
        (record,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
        assert record.stat().st_size > 0
        (probe,) = _read_jsonl(run_dir / "probe.jsonl")
        assert probe["wandb_service"] is None
        assert "continuing without this logger" not in (run_dir / "metaopt.log").read_text()
    assert (sweep_dir / ".submitit").is_dir()  # SLURM's stdout/stderr per job


@pytest.mark.slurm
@pytest.mark.usefixtures("requeue_sweep")
def test_failed_job_is_recorded_and_the_rest_of_the_array_completes(slurm, data_dir, tmp_path):
    proc = _start_sweep("task=rosenbrock", "optimizer=sgd", "optimizer.lr=-1,0.001", *TINY, "logger=none",
                        cwd=tmp_path, env=_sweep_env(slurm, data_dir))
    rc, log, sweep_dir = _finish(proc, tmp_path, timeout=150)
    assert rc == 1  # the failed job is listed after all of them have run
    assert "1 of 2 jobs failed" in log and "Traceback" not in log

    failed, completed = _manifest(sweep_dir)["jobs"]
    assert completed["status"] == "completed" and completed["slurm_job_id"].endswith("_1")
    assert failed["status"] == "failed" and "optimizer.lr" in failed["error"]
    assert failed["slurm_job_id"].split("_")[0] == completed["slurm_job_id"].split("_")[0]
    summary = json.loads((sweep_dir / "0" / "summary.json").read_text())
    assert summary["status"] == "failed" and "optimizer.lr" in summary["error"]
    assert json.loads((sweep_dir / "1" / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slurm
def test_job_killed_by_its_time_limit_is_requeued_and_resumes_to_identical_metrics(
        requeue_sweep, slurm, make_cfg, tmp_path):
    proc, cwd, start = requeue_sweep
    rc, log, sweep_dir = _finish(proc, cwd, timeout=240)
    print(f"\nrequeue run: {time.perf_counter() - start:.1f}s end to end")
    assert rc == 0, log[-4000:]

    (job,) = _manifest(sweep_dir)["jobs"]
    run_dir = Path(job["run_dir"])
    assert job["status"] == "completed" and job["attempts"] >= 2, job
    states = [state for _, state in _sacct(slurm, "--duplicates", "-j", job["slurm_job_id"], "-o", "JobID,State")]
    assert states.count("REQUEUED") >= 1, states
    log_text = (run_dir / "metaopt.log").read_text()
    assert "job requeued after SLURM's signal" in log_text  # by the loop, not by the fallback
    resumed_from = [int(m) for m in re.findall(r"resuming .* from step (\d+)", log_text)]
    assert resumed_from and resumed_from[0] % 1000 != 0  # the checkpoint taken at the signal
    assert [p["restarts"] for p in _read_jsonl(run_dir / "probe.jsonl")] == list(range(job["attempts"]))

    # Every attempt after the first resumed the same W&B run (one id, one offline dir per attempt).
    run_id = (run_dir / "run_id.txt").read_text().strip()
    attempts = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(attempts) == job["attempts"] and all(p.name.endswith(run_id) for p in attempts)

    # The same run never interrupted (no pacing: it does not change the trajectory).
    baseline = tmp_path / "baseline"
    train(make_cfg(*REQUEUE_RUN, tiny=False), run_dir=baseline)
    resumed, full = (json.loads((d / "summary.json").read_text()) for d in (run_dir, baseline))
    assert resumed["final"] == full["final"] and resumed["passes"] == full["passes"]

    assert _without_time(_read_jsonl(run_dir / "metrics.jsonl")) == \
        _without_time(_read_jsonl(baseline / "metrics.jsonl"))


# --- the signal path without a cluster: submitit's own handler, a stand-in for `scontrol requeue` ---

class _Requeueable:
    """Stands in for the Hydra launcher: submitit pickles what ``checkpoint`` returns."""

    def __call__(self) -> None: ...

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


class _Env:
    global_rank = 0

    def __init__(self):
        self.requeued: list[int] = []

    def _requeue(self, countdown: int) -> None:
        self.requeued.append(countdown)


class SignalAt(Callback):
    """Sends this process SLURM's warning signal after a given step, as slurmctld would."""

    def __init__(self, step: int):
        self.step = step

    def after_step(self, step, batch, c):
        if step == self.step:
            import signal

            os.kill(os.getpid(), signal.SIGUSR2)


@pytest.fixture
def submitit_handler(tmp_path, monkeypatch):
    """submitit's SignalHandler on SIGUSR2, as in a job, with ``scontrol requeue`` recorded."""
    import signal

    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import DelayedSubmission, JobPaths

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    delayed = DelayedSubmission(_Requeueable())
    delayed.set_timeout(1, 3)
    env = _Env()
    (tmp_path / "submitit").mkdir()
    handler = SignalHandler(env, JobPaths(tmp_path / "submitit", job_id="1"), delayed)
    previous = signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    yield env
    preemption.job_done()
    signal.signal(signal.SIGUSR2, previous)


def test_signal_checkpoints_at_the_next_step_requeues_and_the_run_resumes_identically(
        submitit_handler, make_cfg, tmp_path):
    overrides = ("task=linreg", "optimizer=sgd", "trainer.steps=40", "trainer.log_every=5", "trainer.eval_every=20",
                 "trainer.checkpoint_every=20", "scheduler=cosine")
    train(make_cfg(*overrides), run_dir=tmp_path / "full")

    assert preemption.install(fallback_s=None)
    cut = tmp_path / "cut"
    with pytest.raises(preemption.Requeued):
        train(make_cfg(*overrides, "++analysis={_target_:test_slurm.SignalAt,step:12}"), run_dir=cut)
    assert submitit_handler.requeued == [2]  # a 1 min limit counts as timed out: one of 3 used
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "requeued"
    assert max(r["step"] for r in _read_jsonl(cut / "metrics.jsonl")) == 10  # the last record before
    from metaopt.runfiles import RunFiles

    assert RunFiles(cut).load_checkpoint()["loop"]["step"] == 13  # the step the signal came after

    preemption.job_done()
    train(make_cfg(*overrides), run_dir=cut)
    resumed, full = (json.loads((d / "summary.json").read_text()) for d in (cut, tmp_path / "full"))
    assert resumed["status"] == "completed" and resumed["final"] == full["final"]
    assert _without_time(_read_jsonl(cut / "metrics.jsonl")) == \
        _without_time(_read_jsonl(tmp_path / "full" / "metrics.jsonl"))


def test_a_signal_the_loop_does_not_reach_in_time_requeues_anyway(submitit_handler):
    import signal

    assert preemption.install(fallback_s=0.2)
    with pytest.raises(preemption.Requeued):
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(5)  # e.g. a long evaluation: no step boundary comes
    assert submitit_handler.requeued == [2]


def test_outside_submitit_nothing_is_installed():
    assert not preemption.install() and not preemption.requested()


def test_meta_training_run_requeues_at_its_next_meta_step_and_resumes_identically(
        submitit_handler, make_cfg, tmp_path):
    import signal

    from omegaconf import open_dict

    overrides = ("task=linreg", "task.dim=3", "task.n_train=16", "task.n_val=8", "task.n_test=0", "task.noise=0",
                 "optimizer=learned_rnn", "optimizer.lopt.hidden_size=8", "meta=truncated_bptt", "meta.steps=6",
                 "meta.unroll=5", "meta.horizon=20", "meta.tasks_per_step=4", "meta.eval_every=3",
                 "meta.eval_tasks=4", "meta.log_every=1", "meta.checkpoint_every=100")

    def cfg():
        c = make_cfg(*overrides)
        with open_dict(c):
            c.meta.baselines = {}
        return c

    train(cfg(), run_dir=tmp_path / "full")
    assert preemption.install(fallback_s=None)
    os.kill(os.getpid(), signal.SIGUSR2)  # arrives while the run is being set up
    with pytest.raises(preemption.Requeued):
        train(cfg(), run_dir=tmp_path / "cut")
    assert submitit_handler.requeued == [2]
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"] == "requeued"
    assert [r["step"] for r in _read_jsonl(tmp_path / "cut" / "metrics.jsonl")] == [1]

    preemption.job_done()
    train(cfg(), run_dir=tmp_path / "cut")
    timing = {"time", "meta/step_time"}
    full, resumed = ([{k: v for k, v in r.items() if k not in timing}
                      for r in _read_jsonl(tmp_path / d / "metrics.jsonl")] for d in ("full", "cut"))
    assert resumed == full and [r["step"] for r in resumed] == list(range(1, 7))
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("timeout_min,warned", [(1, True), (2, False)])
def test_a_time_limit_inside_the_signal_delay_is_warned_about(caplog, timeout_min, warned):
    from omegaconf import OmegaConf

    from metaopt.hydra_callbacks import ClusterJob

    config = OmegaConf.create({"hydra": {"launcher": {"timeout_min": timeout_min, "signal_delay_s": 60}}})
    ClusterJob().on_multirun_start(config)
    assert any("leaves no time before SLURM's warning signal" in r.message for r in caplog.records) == warned
