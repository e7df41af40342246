"""``metaopt.cli_check``: a one-line error for a misspelled config-group option, before Hydra runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from metaopt.cli_check import check_keys, check_overrides, options, selectable_groups


@pytest.mark.parametrize("arg,group,bad", [
    ("optimizer=adamm", "optimizer", "adamm"),
    ("task=mnistt", "task", "mnistt"),
    ("scheduler=cosin", "scheduler", "cosin"),
    ("logger=wandbb", "logger", "wandbb"),
    ("meta=pess", "meta", "pess"),
    ("analysis=line", "analysis", "line"),
    ("experiment=pal_mnist", "experiment", "pal_mnist"),
    ("+experiment=pal_mnist", "experiment", "pal_mnist"),
    ("++optimizer=adamm", "optimizer", "adamm"),
])
def test_misspelled_option_is_one_line_naming_group_value_and_choices(arg, group, bad):
    message = check_overrides(["trainer.steps=10", arg])
    assert message is not None and "\n" not in message
    assert message.startswith(f"{group}: no option {bad!r}")
    assert message.endswith("options: " + ", ".join(options(group)))


def test_suggestion_is_the_closest_option_and_absent_when_none_is_close():
    assert check_overrides(["optimizer=adamm"]).startswith(
        "optimizer: no option 'adamm' (did you mean 'adam'?); options: adam, adamw, ")
    assert "(did you mean 'mnist1d'?)" in check_overrides(["task=mnist"])
    assert check_overrides(["optimizer=zzzz"]).startswith("optimizer: no option 'zzzz'; options: adam, ")


@pytest.mark.parametrize("argv,start", [
    (["-m", "optimizer=adam,pal,lodoo"], "optimizer: no option 'lodoo' (did you mean 'lodo'?)"),
    (["-m", "optimizer=adam, lodoo , pal"], "optimizer: no option 'lodoo' (did you mean 'lodo'?)"),
    (["-m", "task=rosenbrock", "optimizer=adam,sgd", "scheduler=cosine,stepp"],
     "scheduler: no option 'stepp' (did you mean 'step'?)"),
])
def test_one_bad_entry_in_a_sweep_list(argv, start):
    message = check_overrides(argv)
    assert message is not None and message.startswith(start)


@pytest.mark.parametrize("argv", [
    [],
    ["task=two_moons", "optimizer=sgd", "optimizer.lr=0.05", "trainer.steps=3000"],
    ["-m", "optimizer=adam,sgd,pal", "seed=0,1,2"],
    ["-m", "optimizer=adam, sgd , pal"],
    ["+experiment=lopt_linreg"], ["experiment=pal_mnist1d"], ["++experiment=bench_small"],
    ["meta=null", "analysis=null", "experiment=null", "logger=NULL"],
    ["meta=pes", "task=linreg", "optimizer=learned_rnn", "analysis=line_shape", "logger=none"],
    ["optimizer.lr=1e-3", "task.data_dir=/data", "+optimizer.foo=1", "optimizer.adamm=3"],
    ["hydra/launcher=slurm", "hydra/sweeper=suite", "hydra.job.chdir=true", "hydra/launcher=nosuch"],
    ["~analysis", "~meta=none"],
    ["-m", "--help", "-h", "--cfg", "job", "--info", "--multirun"],
    ["optimizer=glob(*)", "task=choice(quadratic,nosuch)", "optimizer=[adam,nosuch]", "task='x y'",
     "optimizer=${oc.env:OPT}", "scheduler=cos*"],
    ["optimizer=adamm", "--config-dir=/elsewhere"],  # another tree: Hydra judges
    ["optimizer=adamm", "-cn", "other"],
    ["pal_compare=nosuch", "report=nosuch", "seed=3", "device=cpu", "nosuch=1"],  # not selectable groups
    ["optimizer@meta.inner=adam"],
])
def test_valid_or_unjudged_arguments_give_none(argv):
    assert check_overrides(argv) is None


def test_groups_are_the_defaults_list_top_level_groups():
    groups = selectable_groups()
    assert {"task", "optimizer", "scheduler", "logger", "meta", "analysis", "experiment"} <= set(groups)
    assert not {"report", "pal_compare"} & set(groups) and not any(g.startswith("hydra") for g in groups)
    assert {"adam", "pal", "lodo", "sgd"} <= set(options("optimizer")) and "mnist1d" in options("task")


def test_importing_it_imports_neither_torch_nor_hydra():
    probe = ("import sys; from metaopt.cli_check import check_overrides; check_overrides(['optimizer=adamm']);"
             "print('torch' in sys.modules, 'hydra' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("argv,start", [
    (["optimizer.lrr=0.1"], "optimizer.lrr: no such key (did you mean 'optimizer.lr'?); keys of optimizer "
                            "(optimizer=adam): _target_, _partial_, lr, betas, "),
    (["sed=1"], "sed: no such key (did you mean 'seed'?); top-level keys: seed, device, trainer, "),
    (["trainer.stepz=3", "seed=1"], "trainer.stepz: no such key (did you mean 'trainer.steps'?); keys of trainer: "),
    (["optimizr.lr=0.1"], "optimizr: no such key (did you mean 'optimizer'?); top-level keys: "),
    (["experiment=greedy_mnist1d", "optimizer.horizonn=3"],
     "optimizer.horizonn: no such key (did you mean 'optimizer.horizon'?); keys of optimizer (optimizer=greedy_sgd): "),
    # A key one swept option lacks is named with that option.
    (["-m", "optimizer=adam,pal", "optimizer.betas=[0.9,0.99]", "seed=0,1"],
     "optimizer.betas: no such key; keys of optimizer (optimizer=pal): _target_, _partial_, measuring_step, "),
    (["task=two_moons", "task.nosuch.deeper=1"], "task.nosuch: no such key; keys of task (task=two_moons): "),
    (["-m", "experiment=greedy_mnist1d,pal_mnist1d", "optimizer.horizon=30"],
     "optimizer.horizon: no such key; keys of optimizer (optimizer=pal, experiment=pal_mnist1d): "),
    # A nested key names the option of the group it lies under.
    (["-m", "meta=pes,es", "optimizer=learned_rnn", "task=linreg", "meta.estimator.stagger=false"],
     "meta.estimator.stagger: no such key; keys of meta.estimator (meta=es): _target_, sigma"),
    # A key of a group left at none names the options to pick first.
    (["meta.steps=5"], "meta.steps: meta is none here (meta=none), so it has no keys; pick one first with "
                       "meta=<name>: es, full_bptt, pes, truncated_bptt"),
    # A misspelled group is pointed at the group, with no advice to add the typo as a key.
    (["experimnt=greedy_mnist1d"], "experimnt: no such key (did you mean the group 'experiment'?); top-level keys: "),
    (["-m", "tasks=two_moons,linreg"], "tasks: no such key (did you mean the group 'task'?); "),
])
def test_misspelled_key_is_one_line_naming_the_closest_key_and_the_keys(argv, start):
    message = check_keys(argv)
    assert message is not None and "\n" not in message
    assert message.startswith(start), message
    # "+key=... adds one" only when nothing close was found: after a typo it would run a junk key.
    assert message.endswith("=... adds one") == ("did you mean" not in message and "pick one" not in message)
    if "experimnt" in argv[0]:
        assert message.endswith("groups: analysis, experiment, logger, meta, optimizer, pal_compare, scheduler, task")


@pytest.mark.parametrize("argv", [
    [], ["optimizer=pal"], ["-m", "optimizer=adam,sgd", "seed=0,1,2"],
    ["optimizer=pal", "optimizer.measuring_step=0.1", "trainer.steps=3", "task.data_dir=/data"],
    ["experiment=greedy_mnist1d", "optimizer.horizon=30"],
    ["+optimizer.foo=1", "optimizer.foo=2"], ["++optimizer.bar=1"],
    ["hydra.job.chdir=true", "hydra.nosuch=1", "hydra/launcher=slurm"],
    ["optimizer.betas.0=0.8"],  # a list index: Hydra judges
    ["optimizer.lrr=0.1", "--cfg", "job", "-cd", "/elsewhere"], ["optimizer.lrr=1", "--help"],
    ["optimizer.lrr=1", "--config-d", "/elsewhere"],  # argparse expands the abbreviation
    ["-m", "optimizer=glob(*)", "optimizer.lrr=1"],  # options from a glob: Hydra judges
    ["optimizer.lr=0.1", "optimizer=adamm"],  # composition fails: Hydra (or check_overrides) reports it
])
def test_existing_added_or_unjudged_keys_give_none(argv):
    assert check_keys(argv) is None


def test_a_sweep_too_large_to_compose_option_by_option_is_checked_on_its_first_job():
    sweep = ["-m", "optimizer=adam,sgd,pal", "task=mnist1d,two_moons,linreg", "scheduler=constant,cosine"]
    assert check_keys([*sweep, "sed=1"]).startswith("sed: no such key (did you mean 'seed'?)")  # 18 jobs
    assert check_keys([*sweep, "optimizer.betas=[0.9,0.99]"]) is None  # adam has it: pal's jobs are Hydra's
    assert check_keys([*sweep[:3], "optimizer.betas=[0.9,0.99]"]).startswith("optimizer.betas: no such key")


def test_a_misspelled_key_on_the_command_line_exits_2_with_one_stderr_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "metaopt", "trainer.stepz=3", f"hydra.run.dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "metaopt: error: " + check_keys(["trainer.stepz=3"])], run.stderr
    assert not (tmp_path / "run").exists()


def test_help_lists_only_groups_a_run_can_select():
    out = subprocess.run([sys.executable, "-m", "metaopt", "--help"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.startswith("metaopt: optimizer meta-learning experiments") and "hydra/launcher=slurm" in out
    listed = out.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    groups = {line.split(":", 1)[0] for line in listed.splitlines()[2:] if ": " in line}
    # pal_compare is selected through experiment=pal_* (its defaults list), not the root's.
    assert groups == set(selectable_groups()) | {"pal_compare"}
