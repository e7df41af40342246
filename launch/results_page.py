"""Assemble docs/results.md from what launch/make_results.sh wrote under docs/results/.

    python launch/results_page.py [docs/results]

Sections are copied from the bench_small report (overview, performance profiles, figures) and the
step-cost tables, so the page is always the latest run's. The hand-written reading of the numbers
between the `<!-- notes -->` markers of an existing page is kept.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

NOTES = re.compile(r"<!-- notes -->.*?<!-- /notes -->", re.S)


def section(markdown: str, title: str) -> str:
    """The body of ``## title`` up to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, re.S | re.M)
    if match is None:
        raise SystemExit(f"results_page: no '## {title}' section in the report")
    return match.group(1).strip()


def relink(text: str, prefix: str) -> str:
    """Links relative to the report dir, made relative to the page."""
    return re.sub(r"\]\((?!https?:|/|#)([^)]+)\)", lambda m: f"]({prefix}/{m.group(1)})", text)


def main(argv: list[str]) -> None:
    results = Path(argv[0] if argv else "docs/results")
    page = results.parent / "results.md"
    report = (results / "bench_small" / "report.md").read_text()
    kept = NOTES.search(page.read_text()) if page.exists() else None
    notes = kept.group(0) if kept else "<!-- notes -->\n(no reading of these numbers yet)\n<!-- /notes -->"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    wall = (results / "bench_small_wall.txt").read_text().strip() if (results / "bench_small_wall.txt").exists() else "?"
    loop = json.loads((results / "loop_overhead.json").read_text()) if (results / "loop_overhead.json").exists() else None
    made = re.search(r"Made (.*?) by", report)
    parts = [
        "# Results",
        "",
        f"Latest run of the benchmark suite and the step-cost benchmark (commit `{commit}`, "
        f"{platform.machine()} CPU, report made {made.group(1) if made else datetime.now(timezone.utc)}). Regenerate with "
        "`bash launch/make_results.sh` (on a quiet machine, ≈ 35 min on 2 cores; it ends by rewriting this page with `launch/results_page.py`).",
        "",
        "## What the numbers say",
        "",
        notes,
        "",
        "## bench_small: six CPU tasks × every optimizer × 6 tuning points × 3 seeds",
        "",
        "`python -m metaopt -m experiment=bench_small` then `python -m metaopt.report <sweep dir>` "
        f"({wall}; two single-threaded workers). Full report: [bench_small/report.md](results/bench_small/report.md) "
        "(per-setting tables, all curves, CSVs).",
        "",
        relink(section(report, "Tasks and targets"), "results/bench_small"),
        "",
        "### Overview",
        "",
        relink(section(report, "Overview"), "results/bench_small"),
        "",
        "### Performance profiles",
        "",
        relink(section(report, "Performance profiles"), "results/bench_small"),
        "",
        "### Curves",
        "",
        "![loss against steps](results/bench_small/loss_vs_steps.png)",
        "",
        "![loss against training time](results/bench_small/loss_vs_time.png)",
        "",
        "## Step cost",
        "",
    ]
    for name, remark in (("step_cost_mnist1d.md", ""),
                         ("step_cost_resnet.md", "ResNet-20 at batch 128; where CIFAR-10 is not on disk the benchmark "
                                                 "times it on random images in the genuine format (a step's cost does "
                                                 "not depend on pixel values).")):
        if (results / name).exists():
            parts += [(results / name).read_text().strip(), ""] + ([remark, ""] if remark else [])
    if loop:
        parts += [f"Training-loop overhead over a bare PyTorch loop (mnist1d MLP, Adam, {loop['steps']} steps, median "
                  f"of {loop['rounds']} rounds, 1 thread): {100 * loop['overhead']:+.1f} % "
                  f"({loop['bare_s']:.3f} s bare, {loop['loop_s']:.3f} s in metaopt's loop). "
                  "`python -m metaopt.bench loop --threads 1 --rounds 5`.", ""]
    page.write_text("\n".join(parts), encoding="utf-8")
    print(f"wrote {page}")


if __name__ == "__main__":
    main(sys.argv[1:])
