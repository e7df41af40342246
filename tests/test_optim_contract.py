"""The contract every optimizer in the registry passes, present and future.

It reduces a quadratic and Rosenbrock; a ``state_dict()`` saved mid-run and loaded into a fresh
instance continues the identical trajectory; bad constructor arguments raise ``ValueError`` naming
the argument; parameter groups work; it runs with and without a closure as it declares.
"""

from __future__ import annotations

import copy

import pytest
import torch

from metaopt.optim import REGISTRY, requires_closure, set_mode

SPECS = sorted(REGISTRY.values(), key=lambda s: s.name)
ids = [s.name for s in SPECS]


def quadratic(x: torch.Tensor) -> torch.Tensor:
    scales = torch.linspace(1.0, 10.0, x.numel(), dtype=x.dtype)
    return 0.5 * (scales * (x - 1.0) ** 2).sum()


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def run(spec, params, loss_fn, steps, opt=None):
    """Minimise ``loss_fn(params)`` (params: list of tensors) for ``steps``; return losses and optimizer."""
    opt = opt or spec.cls(params, **spec.kwargs)
    set_mode(opt, "train")  # Schedule-Free peers refuse to step otherwise, as the loop does
    losses = []

    def closure():
        opt.zero_grad()
        loss = loss_fn(params)
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    for _ in range(steps):
        if spec.needs_closure:
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.step()
        losses.append(float(loss.detach()))
    return losses, opt


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_reduces_quadratic(spec):
    x = torch.zeros(10, requires_grad=True)
    start = float(quadratic(x.detach()))
    run(spec, [x], lambda p: quadratic(p[0]), 500)
    final = float(quadratic(x.detach()))
    assert final < 0.01 * start, f"{spec.name}: {start} -> {final}"


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_reduces_rosenbrock(spec):
    x = torch.tensor([-1.2, 1.0], requires_grad=True)
    start = float(rosenbrock(x.detach()))
    losses, _ = run(spec, [x], lambda p: rosenbrock(p[0]), 500)
    final = float(rosenbrock(x.detach()))
    assert torch.isfinite(torch.tensor(losses)).all()
    assert final < 0.2 * start, f"{spec.name}: {start} -> {final}"


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_state_dict_round_trip_continues_trajectory(spec):
    def fresh():
        torch.manual_seed(1)
        return [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]

    def loss_fn(p):
        return quadratic(p[0].flatten()) + rosenbrock(p[1][:2]) * 0.01 + (p[1] ** 4).sum()

    params = fresh()
    _, opt = run(spec, params, loss_fn, 7)
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    run(spec, params, loss_fn, 6, opt=opt)
    reference = [p.detach().clone() for p in params]

    resumed = [p.clone().requires_grad_(True) for p in saved_params]
    opt2 = spec.cls(resumed, **spec.kwargs)
    opt2.load_state_dict(saved_state)
    run(spec, resumed, loss_fn, 6, opt=opt2)
    for a, b in zip(reference, resumed):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "spec,bad,pattern",
    [(s, bad, pattern) for s in SPECS for bad, pattern in s.invalid],
    ids=[f"{s.name}-{'-'.join(bad)}" for s in SPECS for bad, _ in s.invalid],
)
def test_bad_arguments_raise_value_error_naming_them(spec, bad, pattern):
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=pattern):
        spec.cls([x], **{**spec.kwargs, **bad})


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_every_spec_lists_invalid_arguments(spec):
    assert spec.invalid, f"{spec.name}: register at least one invalid-argument case"


@pytest.mark.parametrize("spec", [s for s in SPECS if s.supports_param_groups], ids=lambda s: s.name)
def test_param_groups_match_separate_optimizers_when_hyperparameters_agree(spec):
    """Two groups with the same settings follow the same trajectory as one group."""
    def loss_fn(p):
        return quadratic(torch.cat([p[0], p[1]]))

    torch.manual_seed(3)
    init = [torch.randn(5), torch.randn(5)]
    a = [t.clone().requires_grad_(True) for t in init]
    b = [t.clone().requires_grad_(True) for t in init]
    run(spec, a, loss_fn, 10, opt=spec.cls(a, **spec.kwargs))
    run(spec, b, loss_fn, 10, opt=spec.cls([{"params": [b[0]]}, {"params": [b[1]]}], **spec.kwargs))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.supports_param_groups and "lr" in s.kwargs],
                         ids=lambda s: s.name)
def test_param_group_lr_is_honoured(spec):
    """A group with lr=0 does not move while the other does."""
    frozen = torch.ones(3, requires_grad=True)
    moving = torch.ones(3, requires_grad=True)
    opt = spec.cls([{"params": [frozen], "lr": 0.0}, {"params": [moving]}], **spec.kwargs)
    run(spec, [frozen, moving], lambda p: quadratic(torch.cat([p[0], p[1]]) * 2), 5, opt=opt)
    torch.testing.assert_close(frozen.detach(), torch.ones(3))
    assert not torch.equal(moving.detach(), torch.ones(3))


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_a_rejected_param_group_is_not_kept(spec):
    """add_param_group that raises leaves param_groups as they were (torch appends before checking)."""
    x = torch.ones(3, requires_grad=True)
    opt = spec.cls([x], **spec.kwargs)
    candidates = [dict(bad) for bad, _ in spec.invalid] + [{}]  # {}: refused where groups are unsupported
    for bad in candidates:
        try:
            opt.add_param_group({"params": [torch.ones(2, requires_grad=True)], **bad})
        except ValueError:
            assert len(opt.param_groups) == 1, f"rejected group {bad} was kept"
        else:
            del opt.param_groups[1:]
    run(spec, [x], lambda p: quadratic(p[0]), 2, opt=opt)


# The methods metaopt implements; the peers' subclasses add torch.optim's __init__ checks to a
# package's class and, like torch.optim, leave groups unchecked.
OWN = [s for s in SPECS if s.cls.__module__.startswith("metaopt.")
       and s.cls.__module__ not in ("metaopt.optim.peers", "metaopt.optim.schedulefree_adamw")]


@pytest.mark.parametrize("spec", OWN, ids=lambda s: s.name)
def test_metaopts_own_optimizers_refuse_each_invalid_value_in_an_added_group(spec):
    """The test above passes when nothing is refused; metaopt's own classes must refuse every entry of
    ``invalid`` in a group too (torch.optim's check only in ``__init__``, which is not ours to change)."""
    for bad, _pattern in spec.invalid:
        opt = spec.cls([torch.ones(3, requires_grad=True)], **spec.kwargs)
        with pytest.raises(ValueError):
            opt.add_param_group({"params": [torch.ones(2, requires_grad=True)], **bad})
        assert len(opt.param_groups) == 1, bad
    if not spec.supports_param_groups:
        opt = spec.cls([torch.ones(3, requires_grad=True)], **spec.kwargs)
        with pytest.raises(ValueError):
            opt.add_param_group({"params": [torch.ones(2, requires_grad=True)]})


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.supports_param_groups], ids=lambda s: s.name)
def test_unsupported_param_groups_are_rejected(spec):
    groups = [{"params": [torch.zeros(2, requires_grad=True)]}, {"params": [torch.zeros(2, requires_grad=True)]}]
    with pytest.raises(ValueError):
        spec.cls(groups, **spec.kwargs)


@pytest.mark.parametrize("spec", SPECS, ids=ids)
def test_closure_declaration(spec):
    x = torch.zeros(3, requires_grad=True)
    opt = spec.cls([x], **spec.kwargs)
    set_mode(opt, "train")
    assert requires_closure(opt) == spec.needs_closure
    # With a closure, every optimizer steps and returns the loss it evaluated.
    def closure():
        opt.zero_grad()
        loss = quadratic(x)
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and torch.isfinite(torch.as_tensor(loss))
    if spec.needs_closure:
        with pytest.raises((RuntimeError, TypeError, ValueError)):
            opt.step()
    else:
        loss = quadratic(x)
        opt.zero_grad()
        loss.backward()
        assert opt.step() is None
