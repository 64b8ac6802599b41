"""The config plumbing every command shares: described fields with their allowed values, the one check of a
config against them, typed configs with one-line errors (`ConfigError`, `to_typed`), and the command line's
unknown-key check (`schema_keys`, `unknown_override`).

Every command's schema (train, eval, export, candidates, the data group) declares each knob with `described`:
its default, what it means, and for a number its range (`ge`, `gt`, `le`, `lt`) or for a closed set its
`choices`. `out_of_range` then checks a whole typed config, nested dataclasses and lists included, so no knob
relies on someone remembering to check it by hand. It lives in `data`, the lowest package, because the data
config uses it as well as the schemas above it.
"""
from __future__ import annotations

import dataclasses
import difflib
import operator
import typing
from dataclasses import fields, is_dataclass

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Bound keyword -> (comparison the value must pass, how the rule reads).
_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def described(default, text: str, *, ge=None, gt=None, le=None, lt=None, choices: tuple | None = None, **kw):
    """A dataclass field with a description and, optionally, the values it allows.

    Args:
      default: the default value (a list or dict default is copied per instance).
      text: what the knob means (shown by the config references and in range errors).
      ge, gt, le, lt: bounds on a number, or on every element of a list of numbers.
      choices: the allowed values of a closed set (of every element, for a list).
      **kw: passed to `dataclasses.field`.
    """
    meta = {"help": text, **{k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("choices", choices))
                             if v is not None}}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def allowed(f: dataclasses.Field) -> str:
    """How `f`'s allowed values read: '> 0', 'in [0, 1)', 'one of a, b'; '' when any value goes."""
    meta = f.metadata
    if "choices" in meta:
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    low = next(((k, meta[k]) for k in ("ge", "gt") if k in meta), None)
    high = next(((k, meta[k]) for k in ("le", "lt") if k in meta), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    if low or high:
        kind, bound = low or high
        return f"{_BOUNDS[kind][1]} {bound}"
    return ""


def _nullable(f: dataclasses.Field) -> str:
    return " or null" if "None" in str(f.type) or "Optional" in str(f.type) else ""


def _fits(f: dataclasses.Field, value) -> bool:
    if "choices" in f.metadata:
        return value in f.metadata["choices"]
    try:
        return all(test(value, f.metadata[k]) for k, (test, _) in _BOUNDS.items() if k in f.metadata)
    except TypeError:  # not a number: a value not yet type-checked (eval's data overrides)
        return False


def value_problem(f: dataclasses.Field, value, key: str) -> str | None:
    """`key=value: must be ...` when `value` is outside `f`'s declared values, else None. None passes (a
    null-able knob); a list passes when every element does."""
    rule = allowed(f)
    if not rule or value is None:
        return None
    if isinstance(value, (list, tuple)):
        if all(_fits(f, v) for v in value):
            return None
        return f"{key}={list(value)!r}: every element must be {rule} ({f.metadata['help']})"
    if _fits(f, value):
        return None
    return f"{key}={value!r}: must be {rule}{_nullable(f)} ({f.metadata['help']})"


def out_of_range(config, prefix: str = "") -> str | None:
    """The first field of the dataclass instance `config` (walked depth first) outside its declared values, as
    a one-line `key=value: must be ...` message with the full dotted key; None when every field is allowed."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = prefix + f.name
        problem = out_of_range(value, key + ".") if dataclasses.is_dataclass(value) else value_problem(f, value, key)
        if problem:
            return problem
    return None


def with_range(f: dataclasses.Field) -> str:
    """`f`'s description followed by its allowed values in brackets, for the config references."""
    rule = allowed(f)
    each = "each " if f.default_factory is not dataclasses.MISSING and isinstance(f.default_factory(), list) else ""
    return f"{f.metadata.get('help', '')} [{each}{rule}{_nullable(f)}]" if rule else f.metadata.get("help", "")


class ConfigError(ValueError):
    """An invalid config; the message is one line naming the key and the value."""


def unknown_override(args: list[str], known: set[str]) -> str | None:
    """The first command-line override naming no known key, as a one-line message; None when all are known.

    Checked before Hydra composes, whose own error for such a key is several lines and exit 1. `known` holds
    every settable key, dotted (`train.prefetch`), and every group or section name (`data`, `train`). Appends
    (`+key=v`), deletions (`~key`), `hydra.*` keys and Hydra's flags are left to Hydra: when any flag (`-m`,
    `--cfg job`, ...) is present, nothing is checked. A malformed override is reported the same way.
    """
    if any(a.startswith("-") for a in args):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parser = OverridesParser.create()
    for arg in args:
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception as e:  # noqa: BLE001 - Hydra's grammar errors span several lines
            return f"{arg}: not a key=value override ({str(e).splitlines()[0]})"
        key = override.key_or_group
        if override.is_add() or override.is_force_add() or override.is_delete() or key in known or key == "hydra" \
                or key.startswith(("hydra.", "hydra/")):
            continue
        close = difflib.get_close_matches(key, sorted(known), 1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{arg}: unknown key (known: {', '.join(_siblings(key, known))}){hint}"
    return None


def _siblings(key: str, known: set[str]) -> list[str]:
    """The known keys beside `key`: those under its deepest known section (the top-level keys if none)."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        section = ".".join(parts[:depth])
        if section in known:
            return sorted(k for k in known if k.rpartition(".")[0] == section)
    return sorted(k for k in known if "." not in k)


def schema_keys(schema, prefix: str = "") -> set[str]:
    """Every key of the dataclass `schema` that a command line may set, dotted: leaves and sections alike."""
    keys, types = set(), typing.get_type_hints(schema)
    for f in fields(schema):
        key = prefix + f.name
        keys.add(key)
        if is_dataclass(types[f.name]):
            keys |= schema_keys(types[f.name], key + ".")
    return keys


def to_typed(schema, raw: dict):
    """`raw` (plain containers) merged onto the dataclass `schema`: unknown keys, wrong types and values outside
    a field's declared range raise `ConfigError("key=value: why")`. Returns the typed dataclass instance."""
    try:
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        value = OmegaConf.select(OmegaConf.create(raw), key) if key != "?" else None
        msg = str(e).splitlines()[0]
        if "not in" in msg or "Key '" in msg:
            raise ConfigError(f"{key}={value!r}: unknown key ({msg})") from None
        raise ConfigError(f"{key}={value!r}: {msg}") from None
    if (problem := out_of_range(typed)) is not None:
        raise ConfigError(problem)
    return typed
