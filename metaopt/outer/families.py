"""Task families: distributions over training problems, sampled and batched over the task axis.

A family turns the configured task (``conf/task/<name>.yaml``, any overrides included) into a
distribution: each draw is that task built with a fresh seed, and a batch of draws is held as
stacked tensors, ``theta0`` ``[P, n]`` (flat initial parameters) and ``data`` (``[P, ...]``). The
loss of P parameter vectors on their P tasks is one call, vectorised over the task axis with
``torch.func.vmap`` + ``functional_call`` of the task's own model and loss, never a Python loop
over tasks. (learned_optimization's TaskFamily ``sample``/``task_fn``, in PyTorch.)

Which family batches a task follows the task's class, through :func:`register_family`:
:class:`SupervisedFamily` for :class:`~metaopt.tasks.SupervisedTask` (per-task data),
:class:`FunctionFamily` for any other :class:`~metaopt.tasks.Task` whose loss is a fixed function
of its parameters (Rosenbrock). A task that fits neither is refused with the reason.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metaopt.errors import ConfigError
from metaopt.tasks._common import generator
from metaopt.tasks.base import Task
from metaopt.tasks.supervised import SupervisedTask

log = logging.getLogger("metaopt")

TaskFactory = Callable[[int], Task]
Data = dict[str, Tensor]

_FAMILIES: dict[type[Task], type[TaskFamily]] = {}


def register_family(task_cls: type[Task]):
    """Class decorator: the family batches ``task_cls`` and its subclasses (most specific wins)."""

    def deco(family_cls: type[TaskFamily]) -> type[TaskFamily]:
        _FAMILIES[task_cls] = family_cls
        return family_cls

    return deco


def family_class(task: Task) -> type[TaskFamily]:
    for cls in type(task).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    raise ConfigError(f"task: no task family batches {type(task).__name__}")


def build_family(make_task: TaskFactory, **options: Any) -> TaskFamily:
    """The family for the tasks ``make_task(seed)`` builds, chosen by their class."""
    template = make_task(0)
    cls = family_class(template)
    try:
        return cls(make_task, template, **options)
    except TypeError as exc:
        raise ConfigError(f"meta.family: {cls.__name__}: {exc}") from None


class _Flat:
    """Flat vector ⇄ a module's named parameters (views, so it works under vmap and autograd)."""

    def __init__(self, module: nn.Module):
        self.names, self.shapes, self.sizes = [], [], []
        for name, p in module.named_parameters():
            self.names.append(name)
            self.shapes.append(p.shape)
            self.sizes.append(p.numel())
        self.numel = sum(self.sizes)

    def flatten(self, module: nn.Module) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def unflatten(self, theta: Tensor, prefix: str = "") -> dict[str, Tensor]:
        parts = torch.split(theta, self.sizes, dim=-1)
        return {prefix + n: t.reshape(*theta.shape[:-1], *s) for n, t, s in zip(self.names, parts, self.shapes)}


class TaskFamily(abc.ABC):
    """A distribution over tasks of one shape.

    Args:
      make_task: ``seed -> Task`` (the configured task with that seed).
      template: ``make_task(0)``; its model gives the parameter layout.
      init_box: ``[low, high]``: draw θ0 uniformly in the box (per coordinate, per task) instead of
        the task's own initialisation (random starts for a deterministic task such as Rosenbrock).
    """

    def __init__(self, make_task: TaskFactory, template: Task, init_box: Sequence[float] | None = None):
        self.make_task = make_task
        self.template = template
        self.device = template.device
        self.flat = _Flat(template.model)
        self.num_params = self.flat.numel
        if init_box is not None:
            init_box = [float(v) for v in init_box]
            if len(init_box) != 2 or not init_box[0] < init_box[1]:
                raise ConfigError(f"meta.family.init_box: must be [low, high] with low < high, got {init_box}")
        self.init_box = init_box

    def sample(self, seeds: Sequence[int]) -> tuple[Tensor, Data]:
        """``(theta0 [P, n], data)`` for the tasks with these seeds."""
        tasks = [self.make_task(int(s)) for s in seeds]
        theta0 = torch.stack([self.flat.flatten(t.model) for t in tasks]).to(self.device)
        if self.init_box is not None:
            lo, hi = self.init_box
            theta0 = torch.stack([
                lo + (hi - lo) * torch.rand(self.num_params, generator=generator(int(s), "init_box"))
                for s in seeds]).to(self.device)
        return theta0, self._data(tasks)

    @abc.abstractmethod
    def _data(self, tasks: list[Task]) -> Data:
        """Stacked per-task tensors (leading axis: task)."""

    def step_data(self, data: Data, seeds: Tensor, steps: Tensor) -> Data:
        """What the loss of inner step ``steps[i]`` of run ``i`` sees (a minibatch, or all data)."""
        del seeds, steps
        return data

    @abc.abstractmethod
    def loss(self, theta: Tensor, data: Data) -> Tensor:
        """Training loss of each run, ``[P]``, for ``theta`` ``[P, n]`` on ``step_data``'s output."""


@register_family(SupervisedTask)
class SupervisedFamily(TaskFamily):
    """Tasks that learn from data: each draw brings its own dataset (and initial weights).

    The loss of run i is the task's ``criterion(model(x_i), y_i)`` with the model's parameters
    replaced by θ_i (``functional_call``), vectorised over runs with ``vmap``. With the task's
    ``batch_size`` set, step t of run i sees ``batch_size`` training examples drawn with replacement
    from a generator seeded by (task seed, t): a different stream from the training loop's epochs,
    equally deterministic. Inputs go through ``task.prepare(x, None)`` (no augmentation).

    Limits: models with buffers (BatchNorm) are refused, and all draws must have the same data
    shapes.
    """

    def __init__(self, make_task: TaskFactory, template: Task, init_box: Sequence[float] | None = None):
        super().__init__(make_task, template, init_box)
        assert isinstance(template, SupervisedTask)
        if any(True for _ in template.model.buffers()):
            raise ConfigError(f"task: {type(template).__name__}'s model has buffers (BatchNorm statistics), "
                              "which meta-training cannot batch over tasks; choose a task without them")
        self.batch_size = template.batch_size
        model, criterion, prepare, flat = template.model, template.criterion, template.prepare, self.flat

        def one(theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
            return criterion(functional_call(model, flat.unflatten(theta), (prepare(x, None),)), y)

        self._loss = vmap(one)

    def _data(self, tasks: list[Task]) -> Data:
        xs, ys = zip(*(t.data["train"] for t in tasks))
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) != 1:
            raise ConfigError(f"task: draws have different training-set shapes {sorted(shapes)}; a family needs "
                              "one shape")
        return {"x": torch.stack(xs).to(self.device), "y": torch.stack(ys).to(self.device)}

    def step_data(self, data: Data, seeds: Tensor, steps: Tensor) -> Data:
        if self.batch_size is None:
            return data
        n = data["x"].shape[1]
        idx = torch.stack([
            torch.randint(n, (self.batch_size,), generator=generator(int(s), "meta-minibatch", int(t)))
            for s, t in zip(seeds.tolist(), steps.tolist())]).to(self.device)
        rows = torch.arange(idx.shape[0], device=self.device).unsqueeze(1)
        return {"x": data["x"][rows, idx], "y": data["y"][rows, idx]}

    def loss(self, theta: Tensor, data: Data) -> Tensor:
        return self._loss(theta, data["x"], data["y"])


class _TaskLoss(nn.Module):
    """``task.loss(None)`` as a module whose parameters are the task model's (for functional_call)."""

    def __init__(self, task: Task):
        super().__init__()
        self.model = task.model
        self._task = [task]  # a list: not registered as a submodule (a Task is no nn.Module)

    def forward(self) -> Tensor:
        return self._task[0].loss(self._task[0].batch(0))


@register_family(Task)
class FunctionFamily(TaskFamily):
    """Tasks whose loss is one fixed function of the parameters (no data, no drift): draws differ
    only in their starting point (the task's seeded init, or ``init_box``).

    On construction it checks, by evaluating two draws at a common random point and the template
    before and after ``advance``, that the loss neither depends on the seed nor moves; a task that
    does (a seeded random quadratic, a drifting optimum) is refused instead of silently batched
    with the template's constants.
    """

    def __init__(self, make_task: TaskFactory, template: Task, init_box: Sequence[float] | None = None):
        super().__init__(make_task, template, init_box)
        wrapper = _TaskLoss(template)
        flat = self.flat

        def one(theta: Tensor) -> Tensor:
            return functional_call(wrapper, flat.unflatten(theta, prefix="model."), ())

        self._loss = vmap(one)
        self._check(make_task, template)
        if self.init_box is None and torch.equal(*self.sample([0, 1])[0]):
            # Every draw is one problem, so the held-out evaluation reruns the training task. That
            # may be meant (one fixed function, as in tests of estimators), so a warning, not an error.
            log.warning("meta.family.init_box is null and %s starts every draw at the same point: meta-training "
                        "and its held-out evaluation see one problem; meta.family.init_box=[low,high] draws "
                        "random starts (experiment=lopt_rosenbrock uses [-2.0,2.0])", type(template).__name__)

    def _check(self, make_task: TaskFactory, template: Task) -> None:
        name = type(template).__name__
        if template.batch(0) is not None:
            raise ConfigError(f"task: {name} has data batches but is no SupervisedTask; no task family batches it")
        probe = torch.randn(1, self.num_params, generator=generator(0, "family-probe")).to(self.device)
        with torch.no_grad():
            ref = self.loss(probe, {})
            other = functional_call(_TaskLoss(make_task(1)), self.flat.unflatten(probe[0], prefix="model."), ())
            template.advance(0)
            moved = self.loss(probe, {})
        if not torch.allclose(ref[0], other):
            raise ConfigError(f"task: {name} draws a different loss function per seed, which FunctionFamily cannot "
                              "batch (it shares one function across draws); meta-train on a supervised task or "
                              "a fixed function, e.g. task=linreg, two_moons, mnist1d or rosenbrock "
                              "(experiment=lopt_*)")
        if not torch.allclose(ref, moved):
            raise ConfigError(f"task: {name} changes its loss as training advances (a moving optimum); "
                              "meta-training needs a stationary task (e.g. task.noise=0)")

    def _data(self, tasks: list[Task]) -> Data:
        del tasks
        return {}

    def loss(self, theta: Tensor, data: Data) -> Tensor:
        del data
        return self._loss(theta)
