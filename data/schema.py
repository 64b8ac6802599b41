"""Described config fields with their allowed values, and the one check of a config against them.

Every command's schema (train, eval, export, candidates, the data group) declares each knob with `described`:
its default, what it means, and for a number its range (`ge`, `gt`, `le`, `lt`) or for a closed set its
`choices`. `out_of_range` then checks a whole typed config, nested dataclasses and lists included, so no knob
relies on someone remembering to check it by hand. It lives in `data`, the lowest package, because the data
config uses it as well as the schemas above it.
"""
from __future__ import annotations

import dataclasses
import operator

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
