"""Analysis tools: plain functions for any model, and :class:`metaopt.train.Callback` s for runs."""

from metaopt.analysis.line_shape import (
    Line,
    LineMinimum,
    LineShape,
    LineShapeProbe,
    Parabola,
    is_locally_convex,
    line_minimum,
    loss_along_line,
    plot_line_shape,
    probe_line,
    summarize,
)

__all__ = [
    "Line",
    "LineMinimum",
    "LineShape",
    "LineShapeProbe",
    "Parabola",
    "is_locally_convex",
    "line_minimum",
    "loss_along_line",
    "plot_line_shape",
    "probe_line",
    "summarize",
]
