"""The one type check of config values: the cluster profile (hpopt/config.py, from TOML) and the
trial config (hpopt/train/config.py, from YAML/JSON or amptorch dicts) accept and refuse the same
way, with the same one-line error naming the key.
"""

from __future__ import annotations

import copy
from typing import Any

from hpopt.errors import HpoptError

_ITEM_TYPES = (int, str)  # what list[...] fields may hold


def _is(value: Any, expected: type) -> bool:
    """isinstance, except that a bool is not an int (TOML/YAML `true` must not pass for a count)."""
    return isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)


def checked(value: Any, expected: Any, what: str) -> Any:
    """`value` as a field declared `expected`, or HpoptError "<what> must be <type>, got ...".

    Ints are accepted for floats (and become floats); a list field takes a list or tuple of its
    item type (returned as a new list); a dict field takes a dict (deep-copied, so the caller's input
    is never shared) or None (empty); a str field takes a class by its name (amptorch passes
    torch.nn.Tanh for an activation).
    """
    if expected in (bool, int, str) and _is(value, expected):
        return value
    if expected is float and (_is(value, int) or _is(value, float)):
        return float(value)
    if expected is str and isinstance(value, type):
        return value.__name__
    for item in _ITEM_TYPES:
        if expected == list[item] and isinstance(value, (list, tuple)) and all(_is(v, item) for v in value):
            return list(value)
    if expected == dict[str, Any] and (value is None or isinstance(value, dict)):
        return {} if value is None else copy.deepcopy(value)
    name = getattr(expected, "__name__", str(expected))
    raise HpoptError(f"{what} must be {name}, got {type(value).__name__} ({value!r})")
