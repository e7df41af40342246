"""Print a sweep's results: one line per job from ``<sweep dir>/manifest.json`` and each run's
``summary.json``. Standard library only, so it runs on any login node.

    python launch/collect.py SWEEP_DIR [--csv results.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def _swept(jobs: list[dict]) -> list[str]:
    """The override keys whose value differs between jobs: what the sweep varied."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for override in job.get("overrides", []):
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    return [key for key, seen in values.items() if len(seen) > 1 or len(jobs) == 1]


def rows(sweep_dir: Path) -> list[dict]:
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    jobs = manifest["jobs"]
    keys = _swept(jobs)
    out = []
    for job in jobs:
        overrides = dict(o.partition("=")[::2] for o in job.get("overrides", []))
        summary_path = Path(job.get("run_dir", "")) / "summary.json"
        summary = json.loads(summary_path.read_text()) if job.get("run_dir") and summary_path.exists() else {}
        final = summary.get("final", {})
        out.append({"num": job["num"], **{k: overrides.get(k, "") for k in keys},
                    "status": job["status"], "slurm_job_id": job.get("slurm_job_id") or "",
                    "attempts": job.get("attempts", 0), "objective": summary.get("objective", ""),
                    **{k: v for k, v in final.items() if isinstance(v, (int, float))},
                    "error": job.get("error", ""), "run_dir": job.get("run_dir", "")})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--csv", type=Path, help="also write the table as CSV")
    args = parser.parse_args(argv)
    if not (args.sweep_dir / "manifest.json").exists():
        parser.error(f"{args.sweep_dir / 'manifest.json'} not found (is this a sweep dir?)")
    table = rows(args.sweep_dir)
    columns = list(dict.fromkeys(k for row in table for k in row))
    shown = [c for c in columns if c not in ("run_dir", "error")]
    widths = {c: max(len(c), *(len(_fmt(row.get(c, ""))) for row in table)) for c in shown}
    print("  ".join(c.ljust(widths[c]) for c in shown))
    for row in table:
        print("  ".join(_fmt(row.get(c, "")).ljust(widths[c]) for c in shown))
        if row["error"]:
            print(f"    error: {row['error']}")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(table)
    return 0


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
