#!/usr/bin/env bash
# A metaopt sweep on a SLURM cluster, submitted from a login node: 3 optimizers x 3 seeds become
# ONE job array of 9 jobs. Copy it, edit the sweep line, run it inside tmux/screen: this command
# waits for the array (the jobs do not depend on it: if it dies they go on, and their run dirs
# and manifest.json keep being written).
#
#   ACCOUNT=my_account PARTITION=gpu launch/sweep-example.sh [more overrides]
#
# Re-running with the same SWEEP_DIR resumes the sweep: finished runs return their recorded
# result at once, interrupted ones continue from their checkpoints.
set -euo pipefail

ACCOUNT="${ACCOUNT:?set ACCOUNT to your SLURM account (sacctmgr show assoc user=\$USER)}"
PARTITION="${PARTITION:?set PARTITION (sinfo -s lists them)}"
SWEEP_DIR="${SWEEP_DIR:-outputs/multirun/$(date +%Y-%m-%d)/$(date +%H-%M-%S-%6N)}"

# Datasets are cached under METAOPT_DATA_DIR: put it on storage every node sees.
export METAOPT_DATA_DIR="${METAOPT_DATA_DIR:-$HOME/.cache/metaopt}"
# W&B offline: each job writes its run under <run dir>/wandb; upload later with `wandb sync`.
# For live runs set WANDB_MODE=online, or pass logger.mode=online as an override (it wins over
# WANDB_MODE); compute nodes need network access and `wandb login`.
export WANDB_MODE="${WANDB_MODE:-offline}"

status=0  # a sweep with failed jobs exits 1 after listing them; collect.py still shows every job
python -m metaopt -m \
  hydra/launcher=slurm \
  hydra.launcher.account="$ACCOUNT" \
  hydra.launcher.partition="$PARTITION" \
  hydra.launcher.gpus_per_task=1 \
  hydra.launcher.cpus_per_task=4 \
  hydra.launcher.mem_gb=16 \
  hydra.launcher.timeout_min=240 \
  hydra.launcher.array_parallelism=16 \
  hydra.sweep.dir="$SWEEP_DIR" \
  logger=wandb \
  task=mnist1d_cnn optimizer=adam,pal,sgd seed=0,1,2 \
  "$@" || status=$?

python "$(dirname "$0")/collect.py" "$SWEEP_DIR"
exit "$status"
