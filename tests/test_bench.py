"""``python -m metaopt.bench steps``: interleaved ratios to Adam with their spread, state bytes."""

from __future__ import annotations

import pytest

from metaopt.bench import BASELINE, all_optimizers, bench_steps, main, steps_table
from metaopt.optim import REGISTRY


def test_step_ratios_are_per_round_medians_with_spread_and_state_bytes():
    result = bench_steps("rosenbrock", ["sgd", "adam"], steps=5, rounds=3, extra=[], progress=False)
    base = result[BASELINE]
    assert base["relative_to_adam"] == base["ratio_min"] == base["ratio_max"] == 1.0
    for r in result.values():
        assert r["ratio_min"] <= r["relative_to_adam"] <= r["ratio_max"] and r["step_ms"] > 0
    assert result["sgd"]["state_bytes_per_param"] == 0.0  # no momentum buffer
    assert result["adam"]["state_bytes_per_param"] >= 8.0  # two float32 moments (+ step counters)
    table = steps_table({"rosenbrock": result}, "header")
    assert table.startswith("header") and "| sgd |" in table and "[" in table


def test_all_optimizers_are_the_registered_configs():
    names = all_optimizers()
    assert {"adam", "pal", "lodo", "metaoptimize", "greedy_sgd"} <= set(names)
    assert set(names) <= set(REGISTRY)


def test_cli_writes_markdown(tmp_path, capsys):
    out = tmp_path / "steps.md"
    main(["steps", "--task", "rosenbrock", "--optimizers", "sgd", "--steps", "3", "--rounds", "2",
          "--markdown", str(out)])
    text = out.read_text()
    assert "python -m metaopt.bench steps --task rosenbrock" in text and "| sgd |" in text
    assert "| sgd |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,flag,bad", [
    (["steps", "--optimizers", "sgd,adamm"], "--optimizers", "adamm"),
    (["steps", "--task", "rosenbrock,mnistt"], "--task", "mnistt"),
    (["loop", "--optimizer", "sgdd"], "--optimizer", "sgdd"),
])
def test_unknown_name_is_a_usage_error_listing_the_choices(capsys, argv, flag, bad):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and f"error: {flag}: no option {bad!r}" in errors[0]
    assert "options: " in errors[0] and ("adam, " in errors[0] or "rosenbrock" in errors[0])
    assert "Traceback" not in captured.err and captured.out == ""  # nothing built or timed
