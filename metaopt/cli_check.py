"""One-line errors for a misspelled config-group option or config key, before Hydra runs.

``python -m metaopt optimizer=adamm`` would otherwise end in Hydra's many-line "Could not find
'optimizer/adamm'" block with the search path. :func:`check_overrides` reads only the file names
under ``conf/`` (no torch, no composition), so it is cheap enough to run on every invocation.
``python -m metaopt optimizer.lrr=0.1`` would end in Hydra's "Key 'lrr' is not in struct" block,
which names neither the valid keys nor the closest one. :func:`check_keys` composes the config
(once per combination of swept group options) only when an argument sets a key.
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Sequence
from typing import Any

from metaopt.config import config_dir

# `[+|++]key=value`: a key of word characters, `/` (nested groups) and `@` (a package), no leading
# `~` (deletion) or `-` (a flag).
_OVERRIDE = re.compile(r"^(?:\+\+|\+)?(?P<key>[A-Za-z_][\w/@.-]*)=(?P<value>.*)$", re.DOTALL)
# Values Hydra parses as sweep functions, lists, dicts, globs, interpolations or quoted strings:
# left to Hydra.
_SPECIAL = set("()[]{}*$'\"\\")
# These change the config directory, primary config or search path: the options under conf/ may
# then not be the ones Hydra sees.
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
# Arguments after which Hydra does not compose the job's config the usual way.
_NO_RUN_FLAGS = ("-h", "--help", "--hydra-help", "-sc", "--shell-completion", "--experimental-rerun")
# A sweep over group options is checked option by option up to this many combinations; a larger
# one only for its first job rather than composed that many times before the first job starts.
_MAX_COMBINATIONS = 16


def options(group: str) -> list[str]:
    """The options of a config group: its ``conf/<group>/**/*.yaml`` paths without the suffix."""
    root = config_dir() / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def _default_entry_key(entry: object) -> str | None:
    """The group a defaults-list entry selects (``optional task@pkg: x`` → ``task``), if any."""
    if not isinstance(entry, dict) or len(entry) != 1:
        return None
    key = str(next(iter(entry))).strip()
    for prefix in ("optional ", "override "):
        if key.startswith(prefix):
            key = key[len(prefix):].strip()
    return key.split("@", 1)[0]


def selectable_groups() -> list[str]:
    """Top-level groups the root config's defaults list selects (``hydra/...`` excluded)."""
    import yaml

    root = config_dir()
    try:
        defaults = (yaml.safe_load((root / "config.yaml").read_text()) or {}).get("defaults") or []
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    groups = []
    for entry in defaults:
        key = _default_entry_key(entry)
        if (key and "/" not in key and not key.startswith("hydra")
                and any((root / key).glob("*.yaml"))):
            groups.append(key)
    return groups


def unknown_option(key: str, bad: str, choices: list[str]) -> str:
    """``key: no option 'bad' (did you mean 'x'?); options: a, b, ...``: one line."""
    close = difflib.get_close_matches(bad, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{key}: no option {bad!r}{hint}; options: {', '.join(choices)}"


def check_overrides(argv: list[str]) -> str | None:
    """A one-line error for the first argument selecting a config-group option that does not exist.

    Looks at ``[+|++]group=value`` arguments for the groups in ``conf/config.yaml``'s defaults list;
    ``value`` may be a comma-separated sweep list. Flags, deletions (``~group``), dotted keys
    (``optimizer.lr=...``), ``hydra...`` keys, ``null`` and values Hydra parses as functions,
    globs, lists or quoted strings are left alone. ``None`` when nothing looks wrong.
    """
    if any(a.split("=", 1)[0] in _CONFIG_FLAGS for a in argv):
        return None
    if any(a.lstrip("+").startswith("hydra.searchpath") for a in argv):
        return None
    groups: list[str] | None = None  # read conf/ only once an argument could select an option
    cache: dict[str, list[str]] = {}
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if match is None:
            continue
        group = match["key"].split("@", 1)[0]
        value = match["value"]
        if "." in group or "/" in group or group.startswith("hydra") or _SPECIAL & set(value):
            continue
        if groups is None:
            groups = selectable_groups()
        if group not in groups:
            continue
        if group not in cache:
            cache[group] = options(group)
        choices = cache[group]
        for item in (v.strip() for v in value.split(",")):
            if item and item.lower() != "null" and item not in choices:
                return unknown_option(group, item, choices)
    return None


def _is_flag(arg: str, flags: tuple[str, ...]) -> bool:
    """``arg`` is one of ``flags``, or an abbreviation argparse would expand to one (``--config-d``)."""
    return arg in flags or (arg.startswith("--") and len(arg) > 3
                            and any(f.startswith("--") and f.startswith(arg) for f in flags))


def _top_level_dirs() -> set[str]:
    return {p.name for p in config_dir().iterdir() if p.is_dir()}


def _missing_key(cfg: Any, key: str) -> tuple[str, str, list[str]] | None:
    """``(first missing path, its parent's path, the parent's keys)`` if ``key`` does not exist.

    Walks the nodes without resolving interpolations. A list, a leaf, ``None``, ``???`` or an
    interpolation on the way ends the walk without a verdict: Hydra judges those.
    """
    from omegaconf import DictConfig

    node, path = cfg, []
    for part in key.split("."):
        if (not isinstance(node, DictConfig) or node._is_none() or node._is_missing()
                or node._is_interpolation()):
            return None
        keys = [str(k) for k in node.keys() if k != "hydra"]
        if part not in keys:
            return ".".join([*path, part]), ".".join(path), keys
        node, path = node._get_node(part), [*path, part]
    return None


def unknown_key(key: str, missing: str, parent: str, keys: list[str], choice: str | None,
                groups: Sequence[str] = ()) -> str:
    """``key: no such key (did you mean 'x'?); keys of parent: a, b, ...``, one line.

    A top-level name is also matched against the config groups (``experimnt=...`` means
    ``experiment=...``). Only when nothing is close does the message add that ``+key=...`` adds a
    new key: after a typo that advice would run the default config with a junk key.
    """
    name = missing.rsplit(".", 1)[-1]
    group = difflib.get_close_matches(name, groups, n=1) if missing == key and "." not in key else []
    close = difflib.get_close_matches(name, keys, n=1)
    if group and (not close or difflib.SequenceMatcher(None, name, group[0]).ratio()
                  >= difflib.SequenceMatcher(None, name, close[0]).ratio()):
        hint = f" (did you mean the group {group[0]!r}?)"
    elif close:
        hint = f" (did you mean {'.'.join([parent, close[0]]).lstrip('.')!r}?)"
    else:
        hint = ""
    where = f"keys of {parent}" + (f" ({choice})" if choice else "") if parent else "top-level keys"
    listing = f"{where}: {', '.join(keys)}" + (f"; groups: {', '.join(groups)}" if not parent and groups else "")
    return f"{missing}: no such key{hint}; {listing}" + ("" if hint else f"; +{key}=... adds one")


def check_keys(argv: list[str]) -> str | None:
    """A one-line error for the first argument that sets a config key the composed config lacks.

    Looks at plain ``key=value`` arguments (not ``+``/``++``, which add keys, nor ``hydra...``).
    The config is composed with the other arguments, once per combination of swept group
    options (``-m optimizer=adam,pal``), so a key that one swept option lacks is named with that
    option (a sweep of more than ``_MAX_COMBINATIONS`` jobs: its first job only). ``None`` when
    nothing is wrong or the arguments are past what this check judges (another config tree, globs
    over options, a list index): Hydra judges those.
    """
    if any(_is_flag(a.split("=", 1)[0], _CONFIG_FLAGS + _NO_RUN_FLAGS) for a in argv):
        return None
    if any(a.lstrip("+").startswith("hydra.searchpath") for a in argv):
        return None
    args = [a for a in argv if _OVERRIDE.match(a)]
    groups = _top_level_dirs()

    def is_key(arg: str) -> bool:
        key = _OVERRIDE.match(arg)["key"]
        return (not arg.startswith("+") and "/" not in key and "@" not in key
                and not key.startswith("hydra") and ("." in key or key not in groups))

    if not any(is_key(a) for a in args):
        return None
    try:
        from hydra import compose, initialize_config_dir
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:  # noqa: BLE001 - a grammar error is Hydra's to report
        return None
    keys: list[str] = []
    choices: list[list[str]] = []  # per structural argument: the arguments it stands for
    for arg, override in zip(args, parsed):
        name = override.key_or_group
        if name.startswith("hydra"):
            continue
        if is_key(arg):
            if not any(part.isdigit() for part in name.split(".")):
                keys.append(name)
            continue
        prefix = "++" if override.is_force_add() else "+" if override.is_add() else ""
        if override.is_sweep_override():
            try:
                values = list(override.sweep_string_iterator())
            except Exception:  # noqa: BLE001 - glob(), range() of options: not judged here
                return None
            if name.split("/", 1)[0] in groups:  # a group option (selected or added): each one
                choices.append([f"{prefix}{name}={v}" for v in values])
            else:  # an added key's value does not change which keys exist
                choices.append([f"{prefix}{name}={values[0]}"])
        else:
            choices.append([arg])
    if not keys:
        return None
    # At most one more than the limit is built: a large sweep's product is never materialised.
    combinations = list(itertools.islice(itertools.product(*choices), _MAX_COMBINATIONS + 1))
    if len(combinations) > _MAX_COMBINATIONS:
        combinations = combinations[:1]  # a key missing from the first job is missing, whatever the rest
    swept = {c[0].lstrip("+").split("=", 1)[0] for c in choices if len(c) > 1}
    group_names = sorted(g for g in groups if g != "hydra")
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            for combination in combinations:
                cfg = compose("config", overrides=list(combination), return_hydra_config=True)
                picked = cfg.hydra.runtime.choices
                for key in keys:
                    group = key.split(".", 1)[0]
                    if "." in key and group in picked and cfg.get(group) is None:
                        # e.g. meta.steps=5 with meta=none: Hydra's advice (+meta.steps) fails next.
                        names = [o for o in options(group) if o != str(picked[group])]
                        return (f"{key}: {group} is {picked[group]} here ({group}={picked[group]}), so it has no "
                                f"keys; pick one first with {group}=<name>: {', '.join(names)}")
                    missing = _missing_key(cfg, key)
                    if missing is not None:
                        path, parent, names = missing
                        # The option the parent comes from, and which swept options this job has.
                        owner = parent.split(".", 1)[0]
                        shown = [f"{g}={picked[g]}" for g in ([owner] if owner in picked else [])]
                        shown += [f"{g}={picked[g]}" for g in sorted(swept) if g in picked and g != owner]
                        return unknown_key(key, path, parent, names, ", ".join(shown) or None, group_names)
    except Exception:  # noqa: BLE001 - any other composition error: Hydra reports it
        return None
    return None
