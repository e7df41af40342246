"""Reverse-engineer a meta-trained recurrent learned optimizer: ``python -m metaopt.analyze <run>``.

Runs the five tools of :mod:`metaopt.analysis.dynamics` (Maheswaranathan et al., "Reverse
engineering learned optimizers reveals known and novel mechanisms", NeurIPS 2021) on the optimizer
stored in ``lopt.pt`` (or a meta-training run directory holding one) and writes, into the output
directory (default ``<run dir>/analysis/``):

- ``fixed_points.png``: trajectories of hidden states and the zero-input fixed points on the top two
  principal components;
- ``linearization.png``: eigenvalues of the recurrent Jacobian at the fixed point, and per mode
  (β_i, α_i) against the optimal heavy-ball (β*, α*) for the curvature range [μ, L];
- ``update_function.png``: Δθ(g) at the initial state and the fixed point over the histogram of
  gradients seen, with the clipping threshold it implies;
- ``schedule.png``: the effective learning rate of the autonomous dynamics from h_0;
- ``adaptation.png``: the effective learning rate at the fixed points of constant gradients;
- ``analysis.json`` (all numbers) and ``summary.md`` (a one-page summary with the figures).

Trajectories and the gradients "seen in training" come from running the optimizer on fresh random
convex quadratics ½(θ−θ*)ᵀH(θ−θ*) whose Hessian spectrum is log-uniform in [μ, L] (the paper's
linear-regression family). μ, L, the dimension and the number of steps are read from the run's
``.hydra/config.yaml`` (``task.eig_min``, ``task.eig_max``, ``task.dim``, ``meta.horizon``) when
there is one, else from the options below.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch

from metaopt.analysis.dynamics import (
    PCA,
    adaptation_curve,
    autonomous_schedule,
    clipping_threshold,
    effective_lr,
    fixed_points,
    linearize,
    optimal_heavy_ball,
    update_function,
)
from metaopt.learned.base import RecurrentLearnedOptimizer, load_lopt, lopt_path
from metaopt.runfiles import atomic_write_bytes

log = logging.getLogger("metaopt.analyze")

FIGURES = ("fixed_points", "linearization", "update_function", "schedule", "adaptation")


def _run_settings(path: Path) -> dict[str, Any]:
    """What the meta-training run says about its tasks (empty when it says nothing)."""
    cfg_file = (path if path.is_dir() else path.parent) / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        return {}
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(cfg_file)
    out = {}
    for key, name in (("task.eig_min", "mu"), ("task.eig_max", "big_l"), ("task.dim", "dim"),
                      ("meta.horizon", "steps")):
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def load_recurrent(path: str | Path) -> RecurrentLearnedOptimizer:
    """The learned optimizer of ``lopt.pt`` (or its run dir), which must be recurrent."""
    lopt = load_lopt(path)
    if not isinstance(lopt, RecurrentLearnedOptimizer):
        raise ValueError(f"checkpoint: {lopt_path(path)} holds a {type(lopt).__name__}, not a recurrent "
                         "learned optimizer (cell/readout/encode/initial_state); the dynamics tools "
                         "need a state that evolves, e.g. RNNOptimizer")
    return lopt


@torch.no_grad()
def quadratic_trajectories(lopt: RecurrentLearnedOptimizer, *, tasks: int, dim: int, steps: int,
                           mu: float, big_l: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states ``[steps+1, tasks·dim, H]`` and gradients ``[steps, tasks·dim]`` of the
    optimizer on random quadratics with spectrum log-uniform in [μ, L] (θ* = 0, θ_0 ~ N(0, I))."""
    gen = torch.Generator().manual_seed(seed)
    dt = next(lopt.parameters()).dtype
    lam = 10 ** (math.log10(mu) + (math.log10(big_l) - math.log10(mu)) * torch.rand(tasks, dim, generator=gen))
    q, _ = torch.linalg.qr(torch.randn(tasks, dim, dim, generator=gen))
    hess = (q * lam.unsqueeze(1)) @ q.transpose(1, 2)
    hess = hess.to(dt)
    theta = torch.randn(tasks, dim, generator=gen).to(dt)
    phi = lopt.meta_params()
    state = lopt.init_state(phi, theta)
    hs, gs = [state["h"].reshape(-1, lopt.hidden_size)], []
    for _ in range(steps):
        grad = (hess @ theta.unsqueeze(-1)).squeeze(-1)
        delta, state = lopt.update(phi, state, theta, grad)
        theta = theta + delta
        hs.append(state["h"].reshape(-1, lopt.hidden_size))
        gs.append(grad.reshape(-1))
    return torch.stack(hs), torch.stack(gs)


def _figure(width: float = 6.0, height: float = 4.0, ncols: int = 1):
    # The Agg canvas directly: no pyplot global state, works without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def analyze(path: str | Path, out_dir: str | Path | None = None, *, tasks: int = 8, dim: int | None = None,
            steps: int | None = None, mu: float | None = None, big_l: float | None = None,
            starts: int = 64, num_g: int = 21, seed: int = 0, progress: str = "auto") -> dict[str, Any]:
    """Run every tool on the optimizer at ``path``; write figures, ``analysis.json`` and
    ``summary.md`` into ``out_dir``; return the JSON contents."""
    path = Path(path).expanduser()
    lopt = load_recurrent(path).double()
    run = _run_settings(path)
    mu = float(mu if mu is not None else run.get("mu", 1e-3))
    big_l = float(big_l if big_l is not None else run.get("big_l", 1.0))
    dim = int(dim if dim is not None else run.get("dim", 20))
    steps = int(steps if steps is not None else run.get("steps", 100))
    out = Path(out_dir) if out_dir is not None else (path if path.is_dir() else path.parent) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    cell, readout, encode = lopt.cell, lopt.readout, lopt.encode
    h0 = lopt.initial_state().detach()
    x0 = encode(torch.zeros((), dtype=h0.dtype))
    result: dict[str, Any] = {"checkpoint": str(lopt_path(path)), "optimizer": type(lopt).__name__,
                              "config": lopt.config(), "curvature": [mu, big_l], "dim": dim,
                              "steps": steps, "tasks": tasks, "idle": bool(lopt.is_idle())}

    from metaopt.progress import Progress

    bar = Progress(progress, total=len(FIGURES) + 1)
    if bar.mode == "lines":
        bar.mode = "none"  # one line per tool below, not the training loop's step lines
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        bar.update(done, {})
        if bar.mode == "lines":
            log.info("analyze: %s done", what)

    # trajectories on the run's task family
    states, grads = quadratic_trajectories(lopt, tasks=tasks, dim=dim, steps=steps, mu=mu, big_l=big_l,
                                           seed=seed)
    tick("trajectories")

    # 1. fixed points from visited states
    gen = torch.Generator().manual_seed(seed)
    flat_states = states.reshape(-1, lopt.hidden_size)
    pick = torch.randint(flat_states.shape[0], (starts,), generator=gen)
    fps = fixed_points(cell, x0, torch.cat([h0.unsqueeze(0), flat_states[pick]]))
    if fps.points.shape[0] == 0:
        best = int(torch.argmin(fps.all_speeds))
        h_star, star_speed = fps.all_points[best], float(fps.all_speeds[best])
    else:
        best = int(torch.argmin(fps.speeds))
        h_star, star_speed = fps.points[best], float(fps.speeds[best])
    pca = PCA.fit(flat_states, k=2)
    fig, (ax,) = _figure()
    proj = pca.transform(states[:, : min(dim, 16)])  # a few coordinates' trajectories
    for j in range(proj.shape[1]):
        ax.plot(proj[:, j, 0], proj[:, j, 1], lw=0.6, alpha=0.6)
    if fps.points.shape[0]:
        p = pca.transform(fps.points)
        ax.scatter(p[:, 0], p[:, 1], marker="x", c="k", s=40, label="fixed points (g = 0)", zorder=3)
    p0 = pca.transform(h0)
    ax.scatter([p0[0]], [p0[1]], marker="o", c="r", s=30, label="h_0", zorder=3)
    ev = pca.explained.tolist() + [0.0, 0.0]
    ax.set(xlabel=f"PC1 ({ev[0]:.0%})", ylabel=f"PC2 ({ev[1]:.0%})",
           title="hidden-state trajectories and fixed points")
    ax.legend(fontsize=8)
    _save(fig, out / "fixed_points.png")
    result["fixed_points"] = {"num_starts": int(fps.kept.numel()), "num_kept": int(fps.kept.sum()),
                              "speed_at_analysed_point": star_speed,
                              "spread": float(fps.points.std(0).norm()) if fps.points.shape[0] > 1 else 0.0,
                              "pca_explained": pca.explained.tolist()}
    tick("fixed points")

    # 2. linearisation at the fixed point
    modes = linearize(cell, readout, h_star, x0, encode=encode)
    a_opt, b_opt = optimal_heavy_ball(mu, big_l)
    fig, (ax1, ax2) = _figure(ncols=2)
    t = torch.linspace(0, 2 * math.pi, 200)
    ax1.plot(t.cos(), t.sin(), c="0.7", lw=0.8)
    ax1.scatter([m.eigenvalue.real for m in modes], [m.eigenvalue.imag for m in modes], s=12)
    ax1.set(xlabel="Re λ", ylabel="Im λ", title="recurrent Jacobian eigenvalues", aspect="equal")
    ax2.scatter([m.beta for m in modes], [m.alpha for m in modes], s=14, label="modes (β_i, α_i)")
    ax2.scatter([b_opt], [a_opt], marker="*", s=120, c="r", label=f"optimal heavy ball [{mu:g}, {big_l:g}]")
    # symlog: the optimum and the modes' α can differ by orders of magnitude, and α can be < 0
    big = max([abs(m.alpha) for m in modes] + [a_opt])
    small = [abs(m.alpha) for m in modes if abs(m.alpha) > 1e-12 * big]
    ax2.set_yscale("symlog", linthresh=max(min(small, default=big) / 2, 1e-12 * big))
    ax2.set(xlabel="β = |λ|", ylabel="α (implied learning rate, symlog)", title="modes as momentum")
    ax2.legend(fontsize=8)
    _save(fig, out / "linearization.png")
    total_alpha = sum(m.alpha for m in modes)
    # A mode's share of the steady update to a constant gradient is α/(1 − β), not α alone.
    dominant = max(modes, key=lambda m: abs(m.alpha) / max(1.0 - m.beta, 1e-12))
    result["linearization"] = {
        "modes": [m.to_dict() for m in modes], "sum_alpha": total_alpha,
        "dominant_mode": dominant.to_dict(), "optimal_heavy_ball": {"alpha": a_opt, "beta": b_opt},
        "effective_lr_at_fixed_point": effective_lr(cell, readout, h_star, 0.0, encode=encode),
    }
    tick("linearization")

    # 3. update function and clipping
    g_abs = grads.abs().flatten()
    g_hi = float(torch.quantile(g_abs, 0.99)) if g_abs.numel() else 1.0
    # well beyond the gradients seen: a threshold is only found where the plateau is reached
    g_range = max(20.0 * g_hi, 1e-3)
    gs = torch.linspace(-g_range, g_range, 800, dtype=torch.float64)
    fig, (ax,) = _figure()
    axh = ax.twinx()
    axh.hist(grads.flatten().clamp(-g_range, g_range).numpy(), bins=80, color="0.85")
    axh.set_yticks([])
    ax.set_zorder(axh.get_zorder() + 1)
    ax.patch.set_visible(False)
    clip = {}
    for name, h in (("initial_state", h0), ("fixed_point", h_star)):
        u = update_function(cell, readout, h, gs, encode=encode)
        s0 = -effective_lr(cell, readout, h, 0.0, encode=encode)
        clip[name] = clipping_threshold(gs, u, slope=s0)
        ax.plot(gs, u, label=f"Δθ(g) at {name.replace('_', ' ')}")
        if clip[name]["threshold"] is not None:
            ax.axvline(clip[name]["threshold"], ls=":", c="k", lw=0.8)
            ax.axvline(-clip[name]["threshold"], ls=":", c="k", lw=0.8)
    ax.set(xlabel="gradient g", ylabel="update Δθ", title="update function (grey: gradients seen)")
    ax.legend(fontsize=8)
    _save(fig, out / "update_function.png")
    result["update_function"] = {"g_range": g_range, "g_abs_p99": g_hi, "clipping": clip}
    tick("update function")

    # 4. autonomous schedule
    sched = autonomous_schedule(cell, readout, h0, steps, encode=encode)
    has_jump = bool(sched.sign_step.abs().max() > 1e-8)
    fig, axes = _figure(ncols=2 if has_jump else 1)
    t_axis = range(1, steps + 1)
    axes[0].plot(t_axis, sched.lr)
    axes[0].set(xlabel="step t", ylabel="effective learning rate −dΔθ/dg at g = 0",
                title="autonomous dynamics from h_0 (learned schedule)")
    if has_jump:
        axes[1].plot(t_axis, sched.sign_step, c="C1")
        axes[1].set(xlabel="step t", ylabel="sign step −[Δθ(0+) − Δθ(0−)]/2",
                    title="signSGD-like part of the update")
    _save(fig, out / "schedule.png")
    lr = sched.lr
    peak = int(torch.argmax(lr.abs()))  # the largest step, whatever its sign
    result["schedule"] = {**sched.to_dict(), "peak_step": peak + 1, "peak_lr": float(lr[peak]),
                          "first_lr": float(lr[0]), "last_lr": float(lr[-1]),
                          "first_sign_step": float(sched.sign_step[0]),
                          "last_sign_step": float(sched.sign_step[-1])}
    tick("schedule")

    # 5. learning-rate adaptation
    g_ad = torch.linspace(-2.0 * g_hi, 2.0 * g_hi, num_g, dtype=torch.float64)
    curve = adaptation_curve(cell, readout, g_ad, h0=h0, encode=encode)
    fig, (ax, ax2) = _figure(ncols=2)
    ax.plot(curve.gs, curve.lr, marker=".")
    ax.set(xlabel="constant gradient g", ylabel="−dΔθ/dg at the fixed point h*(g)",
           title="learning-rate adaptation: slope")
    ax2.plot(curve.gs, curve.update, marker=".", c="C1")
    ax2.set(xlabel="constant gradient g", ylabel="steady update Δθ at h*(g)",
            title="steady update (−Δθ/g: lr per unit gradient)")
    _save(fig, out / "adaptation.png")
    # compare each side with its own smallest |g|: a sign input makes the two sides different maps
    tiny = 1e-9 * float(curve.gs.abs().max())  # linspace leaves ±1e-17 where it means 0
    near_pos = int(torch.where(curve.gs > tiny, curve.gs, math.inf).argmin())
    near_neg = int(torch.where(curve.gs < -tiny, -curve.gs, math.inf).argmin())
    ratios = [float(curve.lr[end] / curve.lr[near]) if curve.lr[near] != 0 else None
              for end, near in ((-1, near_pos), (0, near_neg))]
    result["adaptation"] = {**curve.to_dict(), "ratio_positive": ratios[0], "ratio_negative": ratios[1]}
    tick("adaptation")
    bar.close()

    result["findings"] = _findings(result)
    atomic_write_bytes(out / "analysis.json",
                       lambda fh: fh.write(json.dumps(result, indent=1, allow_nan=False,
                                                      default=str).encode()))
    (out / "summary.md").write_text(_summary(result))
    result["out_dir"] = str(out)
    return result


def _findings(r: dict[str, Any]) -> list[str]:
    """One sentence per mechanism, from the numbers (thresholds are deliberately loose)."""
    f = []
    if r.get("idle"):
        f.append("idle: the readout is zero (never meta-trained), so every update is 0 and the "
                 "findings below describe an optimizer that does nothing")
    lin = r["linearization"]
    dom, opt = lin["dominant_mode"], lin["optimal_heavy_ball"]
    lr_star = r["linearization"]["effective_lr_at_fixed_point"]
    if abs(lin["sum_alpha"] - lr_star) > 0.1 * max(abs(lr_star), 1e-12):
        f.append(f"caution: the modes' Σα = {lin['sum_alpha']:.4g} differs from the update function's slope "
                 f"{lr_star:.4g} at the fixed point: the encoding is discontinuous at g = 0 (a sign input), "
                 "so the linearisation at x = encode(0) describes only the magnitude channel")
    if abs(lin["sum_alpha"]) > 0:
        f.append(f"momentum: dominant mode β = {dom['beta']:.4f} (timescale "
                 f"{dom['timescale'] or float('inf'):.1f} steps), α = {dom['alpha']:.4g}; "
                 f"optimal heavy ball for the curvature range: β* = {opt['beta']:.4f}, α* = {opt['alpha']:.4g}")
    for name, c in r["update_function"]["clipping"].items():
        if abs(c["jump"]) > 0.5 * abs(c["slope_at_zero"]) * r["update_function"]["g_abs_p99"]:
            f.append(f"sign update at {name.replace('_', ' ')}: Δθ jumps at g = 0 (signSGD-like step "
                     f"{c['jump']:.4g}), larger than the linear part over the gradients seen "
                     f"(slope {-c['slope_at_zero']:.4g} × p99 |g| {r['update_function']['g_abs_p99']:.4g})")
        if c["threshold"] is not None:
            f.append(f"clipping at {name.replace('_', ' ')}: the update saturates beyond |g| ≈ {c['threshold']:.4g} "
                     f"(gradients seen: 99th percentile |g| = {r['update_function']['g_abs_p99']:.4g})")
        else:
            f.append(f"no clipping at {name.replace('_', ' ')} within |g| ≤ {r['update_function']['g_range']:.4g}")
    s = r["schedule"]
    # The shape is that of the step size |lr|; a negative lr (a step up the gradient) is said apart.
    first, peak, last = abs(s["first_lr"]), abs(s["peak_lr"]), abs(s["last_lr"])
    if min(s["lr"]) < 0 < max(s["lr"]):
        shape = "changes sign"
    elif peak > 1.05 * first and peak > 1.05 * last:
        shape = "warm-up then decay"
    elif peak > 1.05 * first:
        shape = "warm-up to a plateau"
    elif last < 0.95 * first:
        shape = "decay"
    else:
        shape = "constant"
    negative = " of a negative lr (steps up the gradient)" if max(s["lr"]) < 0 else ""
    f.append(f"schedule: {shape}{negative} (lr {s['first_lr']:.4g} at step 1, largest {s['peak_lr']:.4g} at "
             f"step {s['peak_step']}, {s['last_lr']:.4g} at step {len(s['lr'])})")
    if abs(s["first_sign_step"]) > 1e-8:
        f.append(f"sign-step schedule: {s['first_sign_step']:.4g} at step 1 → {s['last_sign_step']:.4g} "
                 f"at step {len(s['lr'])}")
    a = r["adaptation"]
    g_max = max(abs(g) for g in a["g"])
    thresholds = [c["threshold"] for c in r["update_function"]["clipping"].values() if c["threshold"] is not None]
    for side in ("positive", "negative"):
        ratio = a[f"ratio_{side}"]
        if ratio is None or not math.isfinite(ratio):
            continue
        if ratio < 0:
            f.append(f"adaptation ({side} g): the learning rate at the fixed points changes sign between the "
                     f"smallest and the largest |g| (×{ratio:.3g}): not a step size that adapts")
            continue
        kind = "falls with |g| (RMSProp-like adaptation)" if ratio < 0.9 else \
            ("rises with |g|" if ratio > 1.1 else "about constant (no adaptation)")
        if ratio < 0.9 and thresholds and min(thresholds) < g_max:
            # A clipped update is flatter at large |g| too: this curve alone cannot tell them apart.
            kind += (f", or the clipping at |g| ≈ {min(thresholds):.3g}, which this range (|g| ≤ {g_max:.3g}) "
                     "reaches")
        f.append(f"adaptation ({side} g): the learning rate at the fixed points {kind}: ×{ratio:.3g} "
                 "from the smallest to the largest |g|")
    return f


def _summary(r: dict[str, Any]) -> str:
    lines = [f"# Learned-optimizer analysis: {r['checkpoint']}", "",
             f"{r['optimizer']} {r['config']}; trajectories on {r['tasks']} random quadratics of "
             f"dimension {r['dim']}, curvature in [{r['curvature'][0]:g}, {r['curvature'][1]:g}], "
             f"{r['steps']} steps (Maheswaranathan et al., NeurIPS 2021).", "", "## Findings", ""]
    lines += [f"- {s}" for s in r["findings"]]
    lines += ["", "## Top modes", "", "| λ | β | α | timescale |", "|---|---|---|---|"]
    for m in r["linearization"]["modes"][:8]:
        ts = m["timescale"]
        lines.append(f"| {m['eigenvalue'][0]:.4f}{m['eigenvalue'][1]:+.4f}i | {m['beta']:.4f} | "
                     f"{m['alpha']:.4g} | {'inf' if ts is None else f'{ts:.1f}'} |")
    lines.append("")
    for name in FIGURES:
        lines += [f"![{name}]({name}.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metaopt.analyze", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="meta-training run directory or lopt.pt")
    parser.add_argument("--out", default=None, help="output directory (default <run dir>/analysis)")
    parser.add_argument("--tasks", type=int, default=8, help="random quadratics for trajectories")
    parser.add_argument("--dim", type=int, default=None, help="their dimension (default: run's task.dim or 20)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps of trajectories and schedule (default: run's meta.horizon or 100)")
    parser.add_argument("--mu", type=float, default=None, help="smallest curvature (default: task.eig_min or 1e-3)")
    parser.add_argument("--L", dest="big_l", type=float, default=None,
                        help="largest curvature (default: task.eig_max or 1)")
    parser.add_argument("--starts", type=int, default=64, help="fixed-point searches")
    parser.add_argument("--num-g", type=int, default=21, help="constant gradients of the adaptation curve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        r = analyze(args.path, args.out, tasks=args.tasks, dim=args.dim, steps=args.steps, mu=args.mu,
                    big_l=args.big_l, starts=args.starts, num_g=args.num_g, seed=args.seed,
                    progress=args.progress)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(r["findings"]))
    print(f"figures, analysis.json and summary.md in {r['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
