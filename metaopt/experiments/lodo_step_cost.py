"""LODO's training-step cost relative to Adam on any device: ``python -m metaopt.experiments.lodo_step_cost``.

:mod:`metaopt.bench` times steps on the CPU through the config tree; this script needs only
torch, so it also runs where Hydra is not installed, and on CUDA. It times a full step (forward,
backward, optimizer step) on random data of the shapes of the benchmark tasks: the mnist1d MLP
(40 → 100 → 100 → 10) and ResNet-20 on 32×32 images, both at batch 128. Optimizers are
interleaved round by round so that drift and other load hit them alike; the median is reported.

Liao et al. (TMLR 2023) report LODO "at speeds comparable to those of standard neural network
optimizers" on a ~95k-parameter network.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from metaopt.models import MLP, ResNetCIFAR
from metaopt.optim.lodo import LODO


def _models() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    return {
        "mnist1d_mlp": (lambda: MLP(40, [100, 100], 10), (40,)),
        "resnet20": (lambda: ResNetCIFAR(depth=20), (3, 32, 32)),
    }


def _optimizers() -> dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]:
    return {
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
        "lodo": lambda p: LODO(p, seed=0),
        "lodo_L4_k2_f1": lambda p: LODO(p, n_layers=4, block_size=2, hidden_factor=1.0, seed=0),
        "lodo_diagonal": lambda p: LODO(p, preconditioner="diagonal", seed=0),
    }


def step_cost(model_name: str, optimizers: list[str], device: str, batch: int, steps: int,
              rounds: int) -> dict[str, dict[str, float]]:
    make_model, shape = _models()[model_name]
    dev = torch.device(device)
    runs = {}
    for name in optimizers:
        torch.manual_seed(0)
        model = make_model().to(dev)
        runs[name] = (model, _optimizers()[name](list(model.parameters())))
    x = torch.randn(batch, *shape, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    loss_fn = nn.CrossEntropyLoss()

    def run(model: nn.Module, opt: torch.optim.Optimizer, k: int) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        for _ in range(k):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return (time.perf_counter() - start) / k

    for model, opt in runs.values():
        run(model, opt, max(2, steps // 5))  # warm-up: lazy state, allocator, kernels
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for r in range(rounds):
        for name in optimizers if r % 2 == 0 else optimizers[::-1]:
            times[name].append(run(*runs[name], steps))
    base = statistics.median(times[optimizers[0]])
    n = sum(p.numel() for p in runs[optimizers[0]][0].parameters())
    return {name: {"step_ms": 1e3 * statistics.median(t),
                   f"relative_to_{optimizers[0]}": statistics.median(t) / base,
                   "spread": (max(t) - min(t)) / statistics.median(t), "num_params": n}
            for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metaopt.experiments.lodo_step_cost",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mnist1d_mlp,resnet20")
    parser.add_argument("--optimizers", default="adam,lodo,lodo_L4_k2_f1,lodo_diagonal",
                        help="the first is the baseline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    results = {}
    for model in args.models.split(","):
        results[model] = step_cost(model, args.optimizers.split(","), args.device, args.batch,
                                   args.steps, args.rounds)
        print(f"{model} on {args.device} (batch {args.batch})")
        for name, r in results[model].items():
            ratio = next(v for k, v in r.items() if k.startswith("relative_to_"))
            print(f"  {name:<16}{r['step_ms']:>10.3f} ms{ratio:>8.2f}x  spread {r['spread']:.2f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
