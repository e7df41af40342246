"""The installed wheel finds its config tree when run from another directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_the_config_tree_and_runs_from_elsewhere(tmp_path, data_dir):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(dist)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = dist.glob("metaopt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).relative_to("metaopt/conf").as_posix() for n in names if n.startswith("metaopt/conf/")}
    in_repo = {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*") if p.is_file()}
    assert in_repo <= shipped
    # The suite sweeper is a Hydra plugin: a module of the hydra_plugins namespace package (no __init__).
    assert "hydra_plugins/metaopt_sweeper/suite_sweeper.py" in names
    assert "hydra_plugins/__init__.py" not in names
    assert "metaopt/pretrained/gru_linreg.pt" in names  # weights of optimizer=learned_rnn_linreg

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # PYTHONPATH precedes site-packages, so the wheel's metaopt shadows the development install.
    env = {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "offline", "METAOPT_DATA_DIR": data_dir}
    probe = subprocess.run([sys.executable, "-c", "from metaopt.config import config_dir; print(config_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert Path(probe.stdout.strip()) == target / "metaopt" / "conf"
    proc = subprocess.run([sys.executable, "-m", "metaopt", "task=digits", "trainer.steps=10", "trainer.eval_every=5",
                           "logger=none"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (summary,) = (elsewhere / "outputs" / "runs").glob("*/*/summary.json")
    assert json.loads(summary.read_text())["status"] == "completed"

    # Hydra finds the wheel's sweeper plugin beside the other hydra_plugins (joblib, submitit).
    proc = subprocess.run([sys.executable, "-m", "metaopt", "-m", "experiment=bench_small", "task=linreg",
                           "optimizer=sgd", "seed=0", "hydra.sweeper.tasks.linreg={trainer.steps: 10}",
                           "hydra.sweep.dir=suite"], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((elsewhere / "suite").glob("*/summary.json"))) == 6  # sgd's 6 grid points
