"""MetaOptimize on a CUDA device: correctness and step cost against torch.optim (issue 4).

A prepared check for a machine with a GPU, which the CPU test suite cannot cover:

* ``meta="fixed"`` follows torch.optim's Adam and SGD bit for bit on the GPU too, on the
  multi-tensor path (the default there, as in torch.optim) and on the single-tensor one;
* ``state_dict()`` saved on the GPU resumes the identical trajectory;
* the full (HVP) variant's closure path runs on the GPU and agrees with its exact path;
* the training-step cost (forward, backward, optimizer step; CUDA-synchronised) of MetaOptimize
  against torch.optim on ResNet-20 (CIFAR-sized random batches) and on the MNIST-1D MLP,
  interleaved rounds, medians.

    python -m metaopt.experiments.metaoptimize_gpu_check --out gpu_check.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from metaopt.models.mlp import MLP
from metaopt.models.resnet import ResNetCIFAR
from metaopt.optim.metaoptimize import MetaOptimize


def _batches(shape: tuple[int, ...], classes: int, n: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    return [(torch.randn(*shape, generator=g).to(device), torch.randint(0, classes, (shape[0],), generator=g).to(device))
            for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        x, y = batches[t % len(batches)]
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def check_fixed_is_torch(device: torch.device) -> dict[str, bool]:
    batches = _batches((64, 40), 10, 4, device)
    out = {}
    twins = {"adam": lambda ps, fe: torch.optim.Adam(ps, lr=3e-3, foreach=fe),
             "sgdm": lambda ps, fe: torch.optim.SGD(ps, lr=3e-2, momentum=0.9, foreach=fe)}
    for base, twin in twins.items():
        for foreach in (None, False):
            torch.manual_seed(0)
            a = MLP(40, [100, 100], 10, "relu").to(device)
            b = copy.deepcopy(a)
            _train(a, twin(a.parameters(), foreach), batches, 50)
            _train(b, MetaOptimize(b.parameters(), base=base, meta="fixed", alpha0=3e-3 if base == "adam" else 3e-2,
                                   foreach=foreach), batches, 50)
            out[f"{base}_foreach_{foreach}"] = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    return out


def check_state_dict_round_trip(device: torch.device) -> bool:
    batches = _batches((64, 40), 10, 4, device)
    torch.manual_seed(0)
    model = MLP(40, [100, 100], 10, "relu").to(device)
    opt = MetaOptimize(model.parameters(), blocks="layerwise", alpha0=1e-3, meta_lr=1e-2)
    _train(model, opt, batches, 20)
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, batches, 20, start=20)
    model2 = MLP(40, [100, 100], 10, "relu").to(device)
    model2.load_state_dict(saved[0])
    opt2 = MetaOptimize(model2.parameters(), blocks="layerwise", alpha0=1e-3, meta_lr=1e-2)
    opt2.load_state_dict(saved[1])
    _train(model2, opt2, batches, 20, start=20)
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters())) and opt.alphas() == opt2.alphas()


def check_full_variant(device: torch.device) -> float:
    """Largest relative difference of the trace between the closure (finite difference) and exact paths."""
    hessian = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64, device=device)
    traces = []
    for exact in (False, True):
        x = torch.tensor([1.0, -2.0], dtype=torch.float64, device=device, requires_grad=True)
        opt = MetaOptimize([x], base="sgdm", variant="full", alpha0=0.05, meta_lr=0.01, gamma=0.9)
        for _ in range(10):
            if exact:
                opt.zero_grad()
                (0.5 * x @ hessian @ x).backward(create_graph=True)
                opt.step()
            else:
                def closure(opt=opt, x=x):
                    opt.zero_grad()
                    loss = 0.5 * x @ hessian @ x
                    loss.backward()
                    return loss
                opt.step(closure)
        traces.append(opt.state[x]["trace"].clone())
    return float(((traces[0] - traces[1]).abs().max() / traces[1].abs().max()).item())


def time_steps(make_model, shape, optimizers: dict, device: torch.device, steps: int, rounds: int) -> dict:
    batches = _batches(shape, 10, 8, device)
    runs = {}
    for name, make_opt in optimizers.items():
        torch.manual_seed(0)
        model = make_model().to(device)
        runs[name] = [model, make_opt(model.parameters()), 0]
    times: dict[str, list[float]] = {n: [] for n in runs}
    for run in runs.values():  # warm-up: allocations, lazy state, cuDNN autotuning
        _train(run[0], run[1], batches, 20)
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            model, opt, done = runs[name]
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            _train(model, opt, batches, steps, start=done)
            torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - start) / steps)
            runs[name][2] += steps
    base = statistics.median(times[next(iter(times))])
    return {n: {"step_ms": 1e3 * statistics.median(t), "relative": statistics.median(t) / base} for n, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "fixed_is_torch_bitwise": check_fixed_is_torch(device),
              "state_dict_round_trip_exact": check_state_dict_round_trip(device),
              "full_variant_difference_vs_exact_trace_rel": check_full_variant(device)}
    print(json.dumps(result), flush=True)
    optimizers = {
        "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        "adam_foreach_false": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False),
        "metaoptimize": lambda ps: MetaOptimize(ps, alpha0=1e-3, meta_lr=1e-2),
        "metaoptimize_single_tensor": lambda ps: MetaOptimize(ps, alpha0=1e-3, meta_lr=1e-2, foreach=False),
        "metaoptimize_layerwise": lambda ps: MetaOptimize(ps, alpha0=1e-3, meta_lr=1e-2, blocks="layerwise"),
        "momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        "metaoptimize_sgdm": lambda ps: MetaOptimize(ps, base="sgdm", alpha0=1e-3, meta_lr=1e-2),
    }
    result["timing_resnet20_b128"] = time_steps(lambda: ResNetCIFAR(20, 16, 10), (128, 3, 32, 32), optimizers, device,
                                                args.steps, args.rounds)
    print(json.dumps(result["timing_resnet20_b128"]), flush=True)
    result["timing_mnist1d_mlp_b128"] = time_steps(lambda: MLP(40, [100, 100], 10, "relu"), (128, 40), optimizers,
                                                   device, args.steps * 4, args.rounds)
    print(json.dumps(result["timing_mnist1d_mlp_b128"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
