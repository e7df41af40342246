"""metaopt's suite sweeper as a Hydra plugin (``hydra/sweeper=suite``, ``conf/hydra/sweeper/suite.yaml``).

Sweeps tasks × optimizers × each optimizer's own grid × the ordinary ``params`` (seeds); the
expansion and its checks are :func:`metaopt.sweeper.plan`. Unlike Hydra's basic sweeper, a job
that crashed does not raise at the end of the sweep: every job runs, the report counts failures
as failures, and the failed jobs are listed when the sweep ends.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from metaopt.sweeper import SELECTORS, plan

log = logging.getLogger(__name__)

class SuiteSweeper(BasicSweeper):
    """Sweeps ``tasks`` × ``optimizers`` (each with its own ``grid``) × the ordinary ``params``."""

    def __init__(self, tasks: Mapping[str, Any], optimizers: Mapping[str, Any], max_batch_size: int | None = None,
                 params: Mapping[str, str] | None = None, equal_budget: bool = True) -> None:
        super().__init__(max_batch_size=max_batch_size, params=dict(params or {}))
        self.tasks = OmegaConf.to_container(tasks) if OmegaConf.is_config(tasks) else dict(tasks)
        self.optimizers = OmegaConf.to_container(optimizers) if OmegaConf.is_config(optimizers) else dict(optimizers)
        self.equal_budget = equal_budget

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        selected: dict[str, list[str] | None] = {}
        rest = []
        for override in parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments)):
            key = override.get_key_element()
            if key in SELECTORS:
                selected[key] = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                                 else [override.get_value_element_as_str()])
            else:
                rest.append(override)
        suite, skipped = plan(self.tasks, self.optimizers, selected, self.equal_budget)
        for s in skipped:
            log.warning("suite: skipping optimizer %s", s)
        base = self.split_arguments(rest, None)[0]  # the ordinary product (seeds, fixed overrides)
        jobs = [[*point, *b] for point in suite for b in base]
        log.info("suite: %d jobs (%d task × optimizer × grid points × %d)", len(jobs), len(suite), len(base))

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        # The report's check for jobs that left no run dir reads this.
        (sweep_dir / "suite_jobs.txt").write_text("".join(" ".join(j) + "\n" for j in jobs))
        batch_size = self.max_batch_size or len(jobs)
        returns, index = [], 0
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            self.validate_batch_is_legal(_representatives(batch))
            # Failed jobs are listed from manifest.json when the sweep ends (SweepManifest).
            returns.append(self.launcher.launch(batch, initial_job_idx=index))
            index += len(batch)
        return returns


def _representatives(batch: list[list[str]]) -> list[list[str]]:
    """One job per task and one per optimizer × grid key set: composing every job of a large suite
    up front takes minutes, and these cover every config option and key the batch uses (a job whose
    combination still fails to compose fails alone, recorded like any failed job)."""
    seen, out = set(), []
    for job in batch:
        task = job[0]
        optimizer = (next((o for o in job if o.startswith("optimizer=")), ""),
                     tuple(o.split("=", 1)[0] for o in job if o.startswith("optimizer.")))
        if task not in seen or optimizer not in seen:
            seen.update((task, optimizer))
            out.append(job)
    return out
