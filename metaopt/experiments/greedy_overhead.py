"""Cost of the greedy optimizers' statistics and solves over their base optimizers, in pure PyTorch.

``python -m metaopt.experiments.greedy_overhead [--device cpu|cuda] [--model mnist1d|wide] [--out F]``

Times a full training step (forward, backward, optimizer step) of an MLP for ``torch.optim.SGD``
(momentum 0.9) against :class:`metaopt.optim.GreedySGD` and ``torch.optim.Adam`` against
:class:`metaopt.optim.GreedyAdam`, in interleaved rounds (so load and drift hit all alike), and
reports the median step time and the greedy/base ratio; ``--optimizer-only`` times ``step()``
alone as well. The issue's budget: the statistics and solves cost at most 20% of the base step.
The statistics cost K + 2 passes over the gradient per step (a copy and a (K+1)-row
matrix-vector product), so where the step is memory-bound (large models on a GPU) the overhead
grows with ``--lags``. ``--model mnist1d`` is the MLP of ``task=mnist1d`` (40-100-100-10, batch 128) on random data, so
the script needs neither Hydra nor the dataset; ``metaopt.bench steps`` measures the same through
the configs. ``wide`` (1024-4096-4096-10, batch 256) is sized for a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from metaopt.optim import GreedyAdam, GreedySGD

MODELS = {"mnist1d": ((40, 100, 100, 10), 128), "wide": ((1024, 4096, 4096, 10), 256)}


def optimizers(lags: int) -> dict[str, Callable]:
    return {
        "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
        "greedy_sgd": lambda ps: GreedySGD(ps, lr=1e-3, lags=lags),
        "adam": lambda ps: torch.optim.Adam(ps, lr=1e-4),
        "greedy_adam": lambda ps: GreedyAdam(ps, lr=1e-4, lags=lags),
    }

PAIRS = (("greedy_sgd", "sgd_momentum"), ("greedy_adam", "adam"))


def _mlp(widths: tuple[int, ...]) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def measure(device: str, model_name: str, steps: int, rounds: int, optimizer_only: bool,
            lags: int = 8) -> dict:
    widths, batch = MODELS[model_name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, widths[0], generator=gen).to(device)
    y = torch.randint(0, widths[-1], (batch,), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    runs: dict[str, Callable[[], None]] = {}
    opt_steps: dict[str, Callable[[], None]] = {}
    for name, make in optimizers(lags).items():
        torch.manual_seed(0)
        model = _mlp(widths).to(device)
        opt = make(model.parameters())

        def step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        for _ in range(max(20, steps // 5)):  # warm-up: lazy state, allocator, first solves
            step()
        runs[name], opt_steps[name] = step, opt.step

    def timed(fn: Callable[[], None]) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        return (time.perf_counter() - start) / steps

    full = {n: [] for n in runs}
    alone = {n: [] for n in runs}
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for n in order:
            full[n].append(timed(runs[n]))
            if optimizer_only:
                with torch.no_grad():
                    alone[n].append(timed(opt_steps[n]))
    out: dict = {"device": device, "model": model_name, "lags": lags, "steps": steps, "rounds": rounds,
                 "params": sum(p.numel() for p in _mlp(widths).parameters()), "step_ms": {}, "ratio": {}}
    for n, t in full.items():
        out["step_ms"][n] = 1e3 * statistics.median(t)
        if optimizer_only:
            out.setdefault("optimizer_step_ms", {})[n] = 1e3 * statistics.median(alone[n])
    for greedy, base in PAIRS:
        out["ratio"][f"{greedy}/{base}"] = out["step_ms"][greedy] / out["step_ms"][base]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metaopt.experiments.greedy_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="mnist1d", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=200, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved repetitions (median)")
    parser.add_argument("--optimizer-only", action="store_true", help="also time optimizer.step() alone")
    parser.add_argument("--lags", type=int, default=8, help="K of the greedy optimizers")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    result = measure(args.device, args.model, args.steps, args.rounds, args.optimizer_only, args.lags)
    print(f"device={result['device']} model={result['model']} ({result['params']} parameters), K={args.lags}")
    for n, ms in result["step_ms"].items():
        extra = f"   optimizer.step {result['optimizer_step_ms'][n]:.4f} ms" if "optimizer_step_ms" in result else ""
        print(f"  {n:<14}{ms:9.4f} ms/step{extra}")
    for pair, ratio in result["ratio"].items():
        print(f"  {pair:<26}{ratio:7.3f}  (overhead {100 * (ratio - 1):+.1f}%)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
