"""``python -m metaopt.report <sweep dir> [<sweep dir> ...] [--out DIR] [--targets FILE] [--wandb]``."""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings

from metaopt.report import build_report, log_to_wandb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metaopt.report",
        description="Compare optimizers from the run files of one or more sweeps: tables, curves, "
                    "performance profiles, written to <first sweep dir>/report/ unless --out is given.")
    parser.add_argument("sweeps", nargs="+", help="sweep dirs (outputs/multirun/<date>/<time>), run dirs, or "
                                                  "any folder above them; all runs found are pooled")
    parser.add_argument("--out", help="where to write the report (default: <first sweep dir>/report)")
    parser.add_argument("--targets", help="per-task metrics and targets (default: conf/report_targets.yaml)")
    parser.add_argument("--no-html", action="store_true", help="write report.md only")
    parser.add_argument("--wandb", action="store_true", help="also log the figures as W&B media (offline run "
                                                              "under the report dir; upload with wandb sync)")
    parser.add_argument("--wandb-project", default="metaopt")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m metaopt.report " + " ".join(shlex.quote(a) for a in argv)
    try:
        report = build_report(args.sweeps, out=args.out, targets=args.targets, html=not args.no_html,
                              command=command)
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"metaopt.report: error: {exc}", file=sys.stderr)
        return 2
    runs = report.sweep.runs
    counts = {st: sum(r.status == st for r in runs) for st in ("completed", "diverged", "failed", "incomplete")}
    print(f"{len(runs)} runs: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    for line in report.sweep.missing:
        print(f"missing: {line}")
    for note in report.analysis.notes:
        print(f"note: {note}")
    print(f"report: {report.files['markdown']}")
    if args.wandb:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_dir = log_to_wandb(report, project=args.wandb_project)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        if run_dir is not None:
            print(f"W&B (offline): {run_dir}  (upload: wandb sync {run_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
