"""Cost benchmarks (scripts, not tests): ``python -m metaopt.bench {steps,loop} [options]``.

``steps``: each optimizer's full training step (forward, backward, optimizer step; a closure
optimizer's extra passes included) relative to ``torch.optim.Adam(foreach=True)`` on the same task,
measured in one process and interleaved so drift and other load hit every optimizer alike: each
round times a block of steps of every optimizer, the ratio is taken per round, and the table gives
the median ratio over rounds with its min–max. Also each optimizer's state bytes per model
parameter. Optimizers are built from their ``conf/optimizer/<name>.yaml`` (default: every one).
Tasks: the mnist1d MLP (default) and ResNet-20 (``--task resnet``: CIFAR-10 at batch 128; without the
data on disk, random images in the genuine format stand in, since the step's cost does not depend on
pixel values). A ResNet-20 step takes ≈ 1 s on one CPU thread: use few steps and rounds there
(``--task resnet --steps 3 --rounds 3``), or a GPU.

``meta``: meta-steps per second of a meta-training preset (default ``experiment=lopt_linreg``),
from the outer trainer's own per-step clock (held-out evaluation excluded).

``loop``: the training loop of :func:`metaopt.train.train` against a bare hand-written PyTorch loop
for the same task and optimizer (the loop's budget: at most 5% overhead).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from metaopt.cli_check import options, unknown_option
from metaopt.config import config_dir
from metaopt.optim import optimizer_state_bytes, requires_closure, set_mode
from metaopt.train import _build


def _cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger=none", "trainer.progress=none", *overrides])
    with open_dict(cfg):
        cfg.device = "cpu"
    return cfg


class _Stepper:
    """One task + optimizer, stepping as the training loop does, timed per block of steps."""

    def __init__(self, task_name: str, optimizer_name: str, seed: int, extra: list[str], **optimizer_kwargs):
        cfg = _cfg(f"task={task_name}", f"optimizer={optimizer_name}", *extra)
        torch.manual_seed(seed)
        self.task = _build(cfg.task, "task", seed=seed, device="cpu")
        self.model = self.task.model
        self.optimizer = _build(cfg.optimizer, "optimizer")(self.model.parameters(), **optimizer_kwargs)
        set_mode(self.optimizer, "train")
        self.closure_needed = requires_closure(self.optimizer)
        self.step_index = 0

    def state_bytes_per_param(self) -> float:
        return optimizer_state_bytes(self.optimizer) / sum(p.numel() for p in self.model.parameters())

    def _closure(self, batch):
        def closure():
            if torch.is_grad_enabled():
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.task.loss(batch)
                loss.backward()
                return loss
            return self.task.loss(batch)
        return closure

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            batch = self.task.batch(self.step_index)
            if self.closure_needed:
                self.optimizer.step(self._closure(batch))
            else:
                self.optimizer.zero_grad(set_to_none=True)
                self.task.loss(batch).backward()
                self.optimizer.step()
            self.step_index += 1
        return (time.perf_counter() - start) / steps


BASELINE = "adam (foreach)"


def all_optimizers() -> list[str]:
    """Every optimizer with a config whose class imports (peers only when installed)."""
    from metaopt.optim import REGISTRY

    return [name for name in options("optimizer") if name in REGISTRY]


def _names(value: str) -> list[str]:
    """``"adam, sgd"`` → ``["adam", "sgd"]``."""
    return [name.strip() for name in value.split(",")]


def _check_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An unknown optimizer, task or experiment name: argparse's one-line usage error (exit 2)
    naming the flag, the name and the choices, instead of Hydra's MissingConfigException."""
    checks: list[tuple[str, str, list[str]]] = []
    if args.command == "steps":
        if args.optimizers != "all":
            checks.append(("--optimizers", "optimizer", _names(args.optimizers)))
        checks.append(("--task", "task", _names(args.task)))
    elif args.command == "loop":
        checks += [("--optimizer", "optimizer", [args.optimizer]), ("--task", "task", [args.task])]
    else:
        checks.append(("--experiment", "experiment", [args.experiment]))
    for flag, group, names in checks:
        choices = options(group)
        for name in names:
            if name not in choices:
                parser.error(unknown_option(flag, name, choices))


def _task_extra(task: str, extra: list[str], scratch: Path) -> list[str]:
    """ResNet without CIFAR-10 on disk: random images in the genuine format (timing only)."""
    if task != "resnet" or any(o.startswith(("paths.data_dir=", "task.data_dir=")) for o in extra):
        return extra
    from metaopt.data.cifar10 import cifar10_folder, write_fake_cifar10

    data_dir = Path(str(_cfg("task=resnet").paths.data_dir))
    if cifar10_folder(data_dir).exists():
        return extra
    print(f"note: no CIFAR-10 under {data_dir}: timing ResNet-20 on random images (same cost per step)")
    write_fake_cifar10(scratch, n_train=6000, n_test=100)
    return [f"paths.data_dir={scratch}", "task.n_val=1000", *extra]


def bench_steps(task: str, optimizers: list[str], steps: int, rounds: int, extra: list[str],
                progress: bool = True) -> dict:
    """Median over rounds of each optimizer's step time divided by Adam's in the same round."""
    from tqdm import tqdm

    progress = progress and sys.stderr.isatty()
    names = [BASELINE, *optimizers]
    with tempfile.TemporaryDirectory() as scratch:
        extra = _task_extra(task, extra, Path(scratch))
        steppers = {n: (_Stepper(task, "adam", 0, extra, foreach=True) if n == BASELINE else _Stepper(task, n, 0, extra))
                    for n in tqdm(names, desc=f"{task}: build", disable=not progress, leave=False)}
        for s in steppers.values():
            s.run(max(1, steps // 5))  # warm-up: allocations, lazy state
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in tqdm(range(rounds), desc=f"{task}: rounds", disable=not progress, leave=False):
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                times[n].append(steppers[n].run(steps))
    base = times[BASELINE]
    out = {}
    for n, t in times.items():
        ratios = [a / b for a, b in zip(t, base)]
        out[n] = {"step_ms": 1e3 * statistics.median(t), "relative_to_adam": statistics.median(ratios),
                  "ratio_min": min(ratios), "ratio_max": max(ratios),
                  "state_bytes_per_param": steppers[n].state_bytes_per_param()}
    return out


def steps_table(results: dict[str, dict], header: str) -> str:
    """Markdown: one row per optimizer, one column group per task."""
    tasks = list(results)
    names = list(dict.fromkeys(n for r in results.values() for n in r))
    lines = [header, "", "| optimizer | " + " | ".join(f"{t}: ms/step | {t}: × Adam [min–max]" for t in tasks)
             + f" | state B/param ({tasks[0]}) |", "|---|" + "---:|---:|" * len(tasks) + "---:|"]
    for n in names:
        cells = []
        for t in tasks:
            r = results[t].get(n)
            cells += (["—", "—"] if r is None else
                      [f"{r['step_ms']:.2f}", f"{r['relative_to_adam']:.2f} [{r['ratio_min']:.2f}–{r['ratio_max']:.2f}]"])
        first = results[tasks[0]].get(n)
        state = "—" if first is None else f"{first['state_bytes_per_param']:.1f}"
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {state} |")
    return "\n".join(lines) + "\n"


def bench_loop(task: str, optimizer: str, steps: int, rounds: int, extra: list[str]) -> dict:
    from metaopt.train import train

    bare_times, loop_times = [], []
    for _ in range(rounds):
        stepper = _Stepper(task, optimizer, 0, extra)
        bare_times.append(stepper.run(steps) * steps)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = _cfg(f"task={task}", f"optimizer={optimizer}", f"trainer.steps={steps}",
                       f"trainer.eval_every={steps}", "trainer.log_every=50",
                       f"trainer.checkpoint_every={steps}", *extra)
            train(cfg, run_dir=tmp)
            loop_times.append(json.loads((Path(tmp) / "summary.json").read_text())["wall_time"])
    bare, loop = statistics.median(bare_times), statistics.median(loop_times)
    return {"bare_s": bare, "loop_s": loop, "overhead": loop / bare - 1, "rounds": rounds, "steps": steps}


def bench_meta(experiment: str, steps: int, extra: list[str]) -> dict:
    from metaopt.train import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _cfg(f"experiment={experiment}", f"meta.steps={steps}", "meta.eval_every=0", "meta.eval_tasks=2",
                   "meta.baselines={}", f"meta.checkpoint_every={steps}", f"meta.log_every={steps}", *extra)
        train(cfg, run_dir=tmp)
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    step_time = records[-1]["meta/step_time"]
    return {"experiment": experiment, "meta_steps": steps, "meta_step_s": step_time,
            "meta_steps_per_s": 1.0 / step_time}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metaopt.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_steps = sub.add_parser("steps", help="optimizer step cost relative to Adam")
    p_steps.add_argument("--optimizers", default="all",
                         help="comma-separated conf/optimizer names, or all (every registered one)")
    p_steps.add_argument("--markdown", type=Path, help="also write the table as markdown here")
    p_loop = sub.add_parser("loop", help="training-loop overhead over a bare PyTorch loop")
    p_loop.add_argument("--optimizer", default="adam")
    p_meta = sub.add_parser("meta", help="meta-training speed (meta-steps per second)")
    p_meta.add_argument("--experiment", default="lopt_linreg")
    p_meta.add_argument("--steps", type=int, default=30, help="meta-steps to time")
    p_meta.add_argument("--out", type=Path, help="also write the result as JSON here")
    p_meta.add_argument("--threads", type=int, help="torch intra-op threads")
    p_meta.add_argument("overrides", nargs="*", help="extra config overrides")
    for p, steps, rounds, task in ((p_steps, 100, 7, "mnist1d"), (p_loop, 2000, 5, "mnist1d")):
        p.add_argument("--task", default=task, help="task config name" + ("s, comma-separated" if p is p_steps else ""))
        p.add_argument("--steps", type=int, default=steps, help="steps per timed block")
        p.add_argument("--rounds", type=int, default=rounds, help="interleaved repetitions (median)")
        p.add_argument("--out", type=Path, help="also write the result as JSON here")
        p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); 1 gives "
                       "steadier ratios on a shared machine")
        p.add_argument("overrides", nargs="*", help="extra config overrides, e.g. task.batch_size=256")
    args = parser.parse_args(argv)
    _check_names(sub.choices[args.command], args)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if args.command == "meta":
        result = bench_meta(args.experiment, args.steps, args.overrides)
        print(f"experiment={args.experiment}: {result['meta_step_s']:.3f} s per meta-step, "
              f"{result['meta_steps_per_s']:.2f} meta-steps/s over {args.steps} meta-steps")
    elif args.command == "steps":
        names = all_optimizers() if args.optimizers == "all" else _names(args.optimizers)
        result = {t: bench_steps(t, names, args.steps, args.rounds, args.overrides) for t in _names(args.task)}
        table = steps_table(result, f"Step cost relative to torch.optim.Adam(foreach=True): median over {args.rounds} "
                            f"interleaved rounds of {args.steps} steps [min–max], torch {torch.__version__}, "
                            f"{torch.get_num_threads()} thread(s), CPU. Command: `python -m metaopt.bench "
                            f"{' '.join(argv if argv is not None else sys.argv[1:])}`")
        print(table)
        if args.markdown:
            args.markdown.write_text(table)
    else:
        result = bench_loop(args.task, args.optimizer, args.steps, args.rounds, args.overrides)
        print(f"task={args.task} optimizer={args.optimizer} steps={args.steps} rounds={args.rounds}: "
              f"bare {result['bare_s']:.3f}s, metaopt loop {result['loop_s']:.3f}s, "
              f"overhead {100 * result['overhead']:+.1f}%")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
