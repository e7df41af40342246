"""``python -m metaopt.report <sweep dir(s)>``: compare optimizers from the plain files of their runs.

Reads every run under the directories given (``summary.json``, ``metrics.jsonl``, ``.hydra/``),
groups runs by task × optimizer × setting (the hyperparameters that vary in the sweep), tunes each
optimizer on validation, and writes into ``<first sweep dir>/report/`` (or ``--out``):

- ``report.md`` and ``report.html``: the page, tables inline and figures linked;
- ``table.csv`` (chosen setting per task × optimizer), ``settings.csv``, ``runs.csv``, ``profile.csv``;
- ``loss_vs_{steps,time,passes}.png``, ``lr_eff.png``, ``profile.png``.

Per-task metrics and targets come from ``conf/report_targets.yaml`` (``--targets`` for another file).
The rules (what counts as a failure, how a setting is chosen) are in :mod:`metaopt.report.analysis`.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from metaopt.report.analysis import MEASURES, Analysis, Profile, TargetsFile, analyse, profile
from metaopt.report.runs import Sweep, load_sweeps

log = logging.getLogger("metaopt.report")

__all__ = ["Report", "build_report", "load_sweeps", "analyse", "profile", "TargetsFile"]


@dataclass
class Report:
    sweep: Sweep
    analysis: Analysis
    profiles: dict[str, Profile]
    out: Path
    files: dict[str, Path]


def build_report(sweep_dirs: list[str | os.PathLike], out: str | os.PathLike | None = None,
                 targets: str | os.PathLike | None = None, html: bool = True,
                 command: str | None = None) -> Report:
    from metaopt.report import plots, render  # matplotlib only when a report is made

    absent = [str(d) for d in sweep_dirs if not Path(d).exists()]
    if absent:
        raise FileNotFoundError(f"{', '.join(absent)}: no such directory")
    sweep = load_sweeps(sweep_dirs)
    if not sweep.runs:
        raise FileNotFoundError("no run directories (summary.json, metrics.jsonl or .hydra/config.yaml) under "
                                + ", ".join(map(str, sweep_dirs)))
    out_dir = Path(out) if out is not None else Path(sweep_dirs[0]) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis = analyse(sweep.runs, TargetsFile.load(targets))
    profiles = {m: profile(analysis, m) for m in MEASURES}
    files: dict[str, Path] = dict(render.write_csvs(analysis, sweep, profiles, out_dir))
    figures = plots.all_figures(analysis, profiles, out_dir)
    files.update(figures)
    blocks = render.page_blocks(analysis, sweep, profiles, figures, command)
    files["markdown"] = out_dir / "report.md"
    files["markdown"].write_text(render.to_markdown(blocks), encoding="utf-8")
    if html:
        files["html"] = out_dir / "report.html"
        files["html"].write_text(render.to_html(blocks), encoding="utf-8")
    return Report(sweep=sweep, analysis=analysis, profiles=profiles, out=out_dir, files=files)


def log_to_wandb(report: Report, project: str = "metaopt", name: str | None = None) -> Path | None:
    """The report's figures and main table as W&B media in an offline run under ``<out>/wandb``.

    Optional by design: any failure (W&B missing, broken install) is a warning, never an error,
    because the plain files are already written. Upload later with ``wandb sync``.
    """
    try:
        os.environ.pop("WANDB_SERVICE", None)  # a service of another process is no use here
        import wandb

        from metaopt.report import render

        run = wandb.init(project=project, name=name or f"report-{report.out.parent.name}", job_type="report",
                         dir=str(report.out), mode="offline", reinit="finish_previous",
                         settings=wandb.Settings(console="off", silent=True))
        try:
            media = {f"report/{key}": wandb.Image(str(path)) for key, path in report.files.items()
                     if path.suffix == ".png"}
            media["report/table"] = wandb.Table(columns=render.MAIN_HEADERS, data=render.main_rows(report.analysis))
            run.log(media)
            run_dir = Path(run.dir).parent
        finally:
            run.finish()
        return run_dir
    except Exception as exc:  # noqa: BLE001 - see the docstring
        warnings.warn(f"W&B logging of the report failed ({type(exc).__name__}: {exc}); the report files "
                      f"in {report.out} are complete", RuntimeWarning, stacklevel=2)
        return None
