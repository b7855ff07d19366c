"""The search space: a YAML tree shaped like the trainer config, parsed once, stored in the study.

A leaf mapping with a `type` key is a parameter; any other scalar or list is a fixed value; any
other mapping is a group. Names are dotted config paths (`optim.lr`, `model.num_layers`), so a
trial's values drop straight onto the amptorch-shaped config dict. Example:

    optim:
      lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      epochs: 40                                   # fixed
    model:
      num_layers: {type: int, low: 2, high: 5}
      dropout: {type: categorical, choices: [false, true]}
      dropout_rate: {type: float, low: 0.05, high: 0.5, when: {model.dropout: true}}

`when` makes a parameter conditional: it is suggested only if every named parameter (or fixed
value) equals the given value (a list means "any of"). Parameters are suggested in file order,
so a condition may only name something declared before it. Every mistake is reported as one
`HpoptError` naming the file and the YAML path, because the alternative is a worker crashing an
hour later on the cluster.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from hpopt.errors import HpoptError

PARAM_TYPES = ("int", "float", "categorical")
_KEYS = {
    "int": {"type", "low", "high", "step", "log", "when"},
    "float": {"type", "low", "high", "step", "log", "when"},
    "categorical": {"type", "choices", "when"},
}
Scalar = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Param:
    """One tunable parameter; `when` maps other names to the values that switch it on."""

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def distribution(self) -> Any:
        """The Optuna distribution for this parameter."""
        import optuna.distributions as d

        if self.type == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        if self.type == "float":
            return d.FloatDistribution(float(self.low), float(self.high), log=self.log,
                                       step=None if self.step is None else float(self.step))
        return d.CategoricalDistribution(list(self.choices))

    def grid_values(self) -> list[Any]:
        """Every value of a finite parameter, for the grid sampler."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise HpoptError(f"grid sampler: float parameter {self.name} needs a `step`")
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether this parameter's condition holds for the values chosen so far."""
        return all(name in values and values[name] in allowed for name, allowed in self.when.items())

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.type == "categorical":
            data["choices"] = list(self.choices)
        else:
            data.update(low=self.low, high=self.high, step=self.step, log=self.log)
        if self.when:
            data["when"] = {k: list(v) for k, v in self.when.items()}
        return data

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "Param":
        when = {k: tuple(v) for k, v in data.get("when", {}).items()}
        return Param(name=data["name"], type=data["type"], low=data.get("low"), high=data.get("high"),
                     step=data.get("step"), log=bool(data.get("log", False)),
                     choices=tuple(data.get("choices", ())), when=when)


@dataclass(frozen=True)
class Space:
    """Parameters in suggestion order plus fixed values, all keyed by dotted config path."""

    params: tuple[Param, ...]
    fixed: dict[str, Any]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask an Optuna trial for every active parameter; returns fixed + suggested values."""
        values: dict[str, Any] = dict(self.fixed)
        for param in self.params:
            if not param.active(values):
                continue
            if param.type == "int":
                values[param.name] = trial.suggest_int(param.name, int(param.low), int(param.high),
                                                       step=int(param.step or 1), log=param.log)
            elif param.type == "float":
                values[param.name] = trial.suggest_float(param.name, float(param.low), float(param.high),
                                                         step=param.step, log=param.log)
            else:
                values[param.name] = trial.suggest_categorical(param.name, list(param.choices))
        return values

    def grid(self) -> dict[str, list[Any]]:
        """The grid sampler's search space (every parameter, conditions ignored)."""
        return {p.name: p.grid_values() for p in self.params}

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Space":
        """Fix parameters (or add fixed config values) from `--set key=value` pairs."""
        params = list(self.params)
        fixed = dict(self.fixed)
        for key, value in overrides.items():
            name = self._resolve(key)
            match = [p for p in params if p.name == name]
            if match:
                fixed[name] = _coerce(match[0], value, key)
                params = [p for p in params if p.name != name]
            else:
                fixed[name] = value
        return _check_conditions(Space(tuple(params), fixed), "--set", drop_dead=True)

    def _resolve(self, key: str) -> str:
        """`lr` means `optim.lr` when exactly one name ends that way; dotted keys are taken as given."""
        names = [p.name for p in self.params] + list(self.fixed)
        if key in names or "." in key:
            return key
        hits = [n for n in names if n.split(".")[-1] == key]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise HpoptError(f"--set {key}: ambiguous, matches {', '.join(hits)}; use the dotted name")
        raise HpoptError(
            f"--set {key}: no parameter named {key} (parameters: {', '.join(names) or 'none'}); "
            "use a dotted config path such as optim.epochs to set any other trainer option"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"params": [p.to_dict() for p in self.params], "fixed": dict(self.fixed)}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "Space":
        return Space(tuple(Param.from_dict(p) for p in data.get("params", [])), dict(data.get("fixed", {})))


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as YAML; `1e-3` is a float here (YAML 1.1 says string)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise HpoptError(f"--set {text!r}: expected key=value, e.g. --set optim.lr=1e-3")
    raw = raw.strip()
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:
            value = float(raw)
        except ValueError:
            pass
    return key.strip(), value


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    return dict(parse_override(item) for item in items)


def load_space(path: Path) -> Space:
    """Read and validate a search-space YAML file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise HpoptError(f"search space file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise HpoptError(f"{Path(path).name}: not valid YAML ({' '.join(str(exc).split())})") from None
    return parse_space(data, Path(path).name)


def parse_space(data: Any, source: str = "space") -> Space:
    """Validate the YAML tree; `source` prefixes every error (usually the file name)."""
    if not isinstance(data, dict) or not data:
        raise HpoptError(f"{source}: must be a mapping of config sections to parameters")
    params: list[Param] = []
    fixed: dict[str, Any] = {}
    _walk(data, "", source, params, fixed)
    if not params:
        raise HpoptError(f"{source}: no parameter to tune (a parameter is a mapping with a `type`)")
    return _check_conditions(Space(tuple(params), fixed), source)


def _walk(node: dict[str, Any], prefix: str, source: str, params: list[Param], fixed: dict[str, Any]) -> None:
    for key, value in node.items():
        if not isinstance(key, str) or not key or "." in key:
            raise HpoptError(f"{source}: {prefix}{key!s} is not a valid name (non-empty, no dots)")
        path = f"{prefix}{key}"
        if isinstance(value, dict) and "type" in value:
            params.append(_param(path, value, source))
        elif isinstance(value, dict):
            if not value:
                raise HpoptError(f"{source}: {path} is an empty mapping")
            _walk(value, f"{path}.", source, params, fixed)
        else:
            fixed[path] = value


def _param(path: str, spec: dict[str, Any], source: str) -> Param:
    kind = spec["type"]
    if kind not in PARAM_TYPES:
        raise HpoptError(f"{source}: {path}.type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}")
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise HpoptError(f"{source}: {path}.{unknown[0]} is not a {kind} option "
                         f"(allowed: {', '.join(sorted(_KEYS[kind]))})")
    when = _when(path, spec.get("when", {}), source)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise HpoptError(f"{source}: {path}.choices must be a non-empty list")
        for i, choice in enumerate(choices):
            if not isinstance(choice, Scalar):
                raise HpoptError(f"{source}: {path}.choices[{i}] must be a string, number, bool or null")
        if len({repr(c) for c in choices}) != len(choices):
            raise HpoptError(f"{source}: {path}.choices has duplicates")
        return Param(path, kind, choices=tuple(choices), when=when)
    number = int if kind == "int" else (int, float)
    label = "an int" if kind == "int" else "a number"
    for key in ("low", "high"):
        if key not in spec:
            raise HpoptError(f"{source}: {path}.{key} is required for a {kind} parameter")
    for key in ("low", "high", "step"):
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, number)):
            raise HpoptError(f"{source}: {path}.{key} must be {label}, got {value!r}")
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), spec.get("log", False)
    if not isinstance(log, bool):
        raise HpoptError(f"{source}: {path}.log must be true or false")
    if low > high:
        raise HpoptError(f"{source}: {path}.low ({low}) must not exceed high ({high})")
    if step is not None and step <= 0:
        raise HpoptError(f"{source}: {path}.step must be positive")
    if log and low <= 0:
        raise HpoptError(f"{source}: {path}.low must be > 0 when log is true")
    if log and step not in (None, 1):
        raise HpoptError(f"{source}: {path}: log and step cannot be combined")
    if kind == "float":
        low, high = float(low), float(high)
        step = None if step is None else float(step)
    return Param(path, kind, low=low, high=high, step=step, log=log, when=when)


def _when(path: str, raw: Any, source: str) -> dict[str, tuple[Any, ...]]:
    if not isinstance(raw, dict):
        raise HpoptError(f"{source}: {path}.when must map parameter names to values, e.g. {{model.dropout: true}}")
    return {str(k): tuple(v) if isinstance(v, list) else (v,) for k, v in raw.items()}


def _check_conditions(space: Space, source: str, drop_dead: bool = False) -> Space:
    """Conditions may only name earlier parameters or fixed values, with values they can take.

    With `drop_dead` (after `--set`), a parameter whose condition can no longer hold (dropout
    fixed off) is dropped instead of being an error.
    """
    seen: dict[str, tuple[Any, ...] | None] = {name: (value,) for name, value in space.fixed.items()}
    kept: list[Param] = []
    for param in space.params:
        alive = True
        for name, allowed in param.when.items():
            if name not in seen:
                raise HpoptError(f"{source}: {param.name}.when.{name} names no parameter declared before "
                                 f"{param.name}")
            possible = seen[name]
            if possible is not None and not any(v in possible for v in allowed):
                if not drop_dead:
                    raise HpoptError(f"{source}: {param.name}.when.{name}: {name} can never be "
                                     f"{' or '.join(map(repr, allowed))}")
                alive = False
        if alive:
            kept.append(param)
            seen[param.name] = param.choices if param.type == "categorical" else None
    return Space(tuple(kept), space.fixed)


def _coerce(param: Param, value: Any, key: str) -> Any:
    """A `--set` value must have the parameter's type (ints stay ints)."""
    if param.type == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise HpoptError(f"--set {key}: {param.name} is an int parameter, got {value!r}")
    elif param.type == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HpoptError(f"--set {key}: {param.name} is a float parameter, got {value!r}")
        value = float(value)
    return value


def apply_values(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer config: `base` with each dotted name set (missing sections are created)."""
    config = copy.deepcopy(dict(base))
    for name, value in values.items():
        node = config
        *parents, leaf = name.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    return config
