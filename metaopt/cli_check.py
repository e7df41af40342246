"""One-line errors for a misspelled config-group option, before Hydra composes anything.

``python -m metaopt optimizer=adamm`` would otherwise end in Hydra's many-line "Could not find
'optimizer/adamm'" block with the search path. :func:`check_overrides` reads only the file names
under ``conf/`` (no torch, no composition), so it is cheap enough to run on every invocation.
"""

from __future__ import annotations

import difflib
import re

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
