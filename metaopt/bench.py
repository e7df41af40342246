"""Cost benchmarks (scripts, not tests): ``python -m metaopt.bench {steps,loop} [options]``.

``steps``: each optimizer's full training step (forward, backward, optimizer step; a closure
optimizer's extra passes included) relative to ``torch.optim.Adam`` on the same task, measured in
one process and interleaved so drift and other load hit every optimizer alike. Optimizers are
built from their ``conf/optimizer/<name>.yaml``.

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
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from metaopt.config import config_dir
from metaopt.optim import requires_closure


def _cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger=none", "trainer.progress=none", *overrides])
    with open_dict(cfg):
        cfg.device = "cpu"
    return cfg


class _Stepper:
    """One task + optimizer, stepping as the training loop does, timed per block of steps."""

    def __init__(self, task_name: str, optimizer_name: str, seed: int, extra: list[str]):
        cfg = _cfg(f"task={task_name}", f"optimizer={optimizer_name}", *extra)
        torch.manual_seed(seed)
        self.task = instantiate(cfg.task, seed=seed, device="cpu")
        self.model = self.task.model
        self.optimizer = instantiate(cfg.optimizer)(self.model.parameters())
        self.closure_needed = requires_closure(self.optimizer)
        self.step_index = 0

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


def bench_steps(task: str, optimizers: list[str], steps: int, rounds: int, extra: list[str]) -> dict:
    names = ["adam", *[n for n in optimizers if n != "adam"]]
    steppers = {n: _Stepper(task, n, 0, extra) for n in names}
    for s in steppers.values():
        s.run(max(1, steps // 5))  # warm-up: allocations, lazy state
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            times[n].append(steppers[n].run(steps))
    base = statistics.median(times["adam"])
    return {n: {"step_ms": 1e3 * statistics.median(t), "relative_to_adam": statistics.median(t) / base,
                "spread": (max(t) - min(t)) / statistics.median(t)} for n, t in times.items()}


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
    p_steps.add_argument("--optimizers", default="sgd,momentum,adam,rmsprop,pal",
                         help="comma-separated conf/optimizer names")
    p_loop = sub.add_parser("loop", help="training-loop overhead over a bare PyTorch loop")
    p_loop.add_argument("--optimizer", default="adam")
    p_meta = sub.add_parser("meta", help="meta-training speed (meta-steps per second)")
    p_meta.add_argument("--experiment", default="lopt_linreg")
    p_meta.add_argument("--steps", type=int, default=30, help="meta-steps to time")
    p_meta.add_argument("--out", type=Path, help="also write the result as JSON here")
    p_meta.add_argument("--threads", type=int, help="torch intra-op threads")
    p_meta.add_argument("overrides", nargs="*", help="extra config overrides")
    for p, steps, rounds in ((p_steps, 200, 7), (p_loop, 2000, 5)):
        p.add_argument("--task", default="mnist1d")
        p.add_argument("--steps", type=int, default=steps, help="steps per timed block")
        p.add_argument("--rounds", type=int, default=rounds, help="interleaved repetitions (median)")
        p.add_argument("--out", type=Path, help="also write the result as JSON here")
        p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); 1 gives "
                       "steadier ratios on a shared machine")
        p.add_argument("overrides", nargs="*", help="extra config overrides, e.g. task.batch_size=256")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if args.command == "meta":
        result = bench_meta(args.experiment, args.steps, args.overrides)
        print(f"experiment={args.experiment}: {result['meta_step_s']:.3f} s per meta-step, "
              f"{result['meta_steps_per_s']:.2f} meta-steps/s over {args.steps} meta-steps")
    elif args.command == "steps":
        result = bench_steps(args.task, args.optimizers.split(","), args.steps, args.rounds, args.overrides)
        print(f"{'optimizer':<24}{'ms/step':>10}{'× Adam':>9}{'spread':>9}   task={args.task}")
        for name, r in result.items():
            print(f"{name:<24}{r['step_ms']:>10.3f}{r['relative_to_adam']:>9.3f}{r['spread']:>9.2f}")
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
