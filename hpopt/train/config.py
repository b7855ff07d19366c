"""One trial's training configuration, in the shape of amptorch's `AtomsTrainer` config.

Search spaces are written against amptorch's keys (`model.num_layers`, `optim.lr`, ...), so the
same trial config drives the native trainer and amptorch. Missing keys take the defaults below;
unknown keys and wrong types are rejected with one line naming the key, because a typo in a
search space otherwise silently tunes nothing for a thousand trials.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from hpopt.errors import HpoptError
from hpopt.typecheck import checked

ACTIVATIONS = ("tanh", "relu", "gelu", "silu", "sigmoid", "softplus", "elu", "leakyrelu")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("StepLR", "ExponentialLR", "CosineAnnealingLR", "ReduceLROnPlateau")
FP_SCHEMES = ("auto", "gaussian", "weighted")
ANGULAR_FUNCTIONS = ("g5", "g4")
TRAINERS = ("native", "amptorch")


def default_fp_params() -> dict[str, Any]:
    """amptorch's example Gaussian set: 4 radial and 4 angular functions per channel."""
    return {
        "G2": {"etas": [0.05, 0.23207944, 1.07721735, 5.0], "rs_s": [0.0]},
        "G4": {"etas": [0.005], "zetas": [1.0, 4.0], "gammas": [1.0, -1.0]},
    }


@dataclass
class ModelConfig:
    name: str = "singlenn"  # "singlenn": one network for all elements; "bpnn": one per element
    num_layers: int = 3
    num_nodes: int = 20
    hidden_layers: list[int] = field(default_factory=list)  # overrides num_layers x num_nodes
    activation: str = "tanh"
    batchnorm: bool = False
    dropout: bool = False
    dropout_rate: float = 0.0
    initialization: str = "xavier"  # "xavier" | "kaiming"

    @property
    def widths(self) -> list[int]:
        return list(self.hidden_layers) or [self.num_nodes] * self.num_layers


@dataclass
class OptimConfig:
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 100
    loss: str = "mse"  # "mse" | "mae", on per-atom energy residuals in scaled units
    optimizer: str = "adam"
    weight_decay: float = 0.0
    scheduler: dict[str, Any] = field(default_factory=dict)  # {"policy": "StepLR", "params": {...}}
    patience: int = 0  # early stopping: epochs without a better validation MAE; 0 = off
    gpus: int = 0  # amptorch's switch; the `device` argument of run_trial wins


@dataclass
class DatasetConfig:
    fp_scheme: str = "auto"  # "gaussian" (element-resolved), "weighted" (Gastegger 2018), "auto"
    fp_params: dict[str, Any] = field(default_factory=default_fp_params)
    cutoff: float = 6.0  # Angstrom, cosine cutoff of the radial (G2) functions
    angular_cutoff: float = 0.0  # Angstrom, cutoff of the angular functions; 0: same as cutoff
    angular: str = "g5"  # "g5": Behler's G5 from O(pairs) moments (whole zetas); "g4": exact G4, O(triplets)
    auto_max_elements: int = 4  # "auto" uses "gaussian" up to this many elements, else "weighted"


@dataclass
class CmdConfig:
    seed: int = 0
    dtype: str = "float32"  # "float32" | "float64"


@dataclass
class TrainConfig:
    """The parsed, validated trial config; `as_dict()` gives back the amptorch-shaped dict."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    cmd: CmdConfig = field(default_factory=CmdConfig)
    trainer: str = "native"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "optim": OptimConfig, "dataset": DatasetConfig, "cmd": CmdConfig}


def default_config() -> dict[str, Any]:
    """The full default config dict, the starting point for search spaces."""
    return TrainConfig().as_dict()


def _fill(target: Any, values: dict[str, Any], prefix: str) -> None:
    hints = get_type_hints(type(target))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise HpoptError(f"train config: unknown key '{prefix}{key}' (known in {prefix[:-1]}: {known})")
        setattr(target, key, checked(value, hints[key], f"train config: '{prefix}{key}'"))


def _choice(value: str, allowed: tuple[str, ...], key: str, *, fold: bool = True) -> str:
    match = {a.lower() if fold else a: a for a in allowed}.get(value.lower() if fold else value)
    if match is None:
        raise HpoptError(f"train config: '{key}' is {value!r}; choose one of {', '.join(allowed)}")
    return match


def _validate(cfg: TrainConfig) -> None:
    m, o, d, c = cfg.model, cfg.optim, cfg.dataset, cfg.cmd
    m.name = _choice(m.name, ("singlenn", "bpnn"), "model.name")
    m.activation = _choice(m.activation, ACTIVATIONS, "model.activation")
    m.initialization = _choice(m.initialization, ("xavier", "kaiming"), "model.initialization")
    o.optimizer = _choice(o.optimizer, OPTIMIZERS, "optim.optimizer")
    o.loss = _choice(o.loss, ("mse", "mae"), "optim.loss")
    d.fp_scheme = _choice(d.fp_scheme, FP_SCHEMES, "dataset.fp_scheme")
    d.angular = _choice(d.angular, ANGULAR_FUNCTIONS, "dataset.angular")
    c.dtype = {"double": "float64", "float": "float32"}.get(c.dtype, c.dtype)
    c.dtype = _choice(c.dtype, ("float32", "float64"), "cmd.dtype")
    cfg.trainer = _choice(cfg.trainer, TRAINERS, "trainer")
    positive = {"model.num_layers": m.num_layers, "model.num_nodes": m.num_nodes, "optim.lr": o.lr,
                "optim.batch_size": o.batch_size, "optim.epochs": o.epochs, "dataset.cutoff": d.cutoff}
    for key, value in positive.items():
        if value <= 0:
            raise HpoptError(f"train config: '{key}' must be > 0, got {value}")
    if not 0 <= d.angular_cutoff <= d.cutoff:
        raise HpoptError(f"train config: 'dataset.angular_cutoff' must be in [0, cutoff], got {d.angular_cutoff}")
    if any(w <= 0 for w in m.hidden_layers):
        raise HpoptError(f"train config: 'model.hidden_layers' must be positive widths, got {m.hidden_layers}")
    if not 0.0 <= m.dropout_rate < 1.0:
        raise HpoptError(f"train config: 'model.dropout_rate' must be in [0, 1), got {m.dropout_rate}")
    if o.scheduler:
        unknown = set(o.scheduler) - {"policy", "params"}
        if unknown:
            raise HpoptError(f"train config: unknown key 'optim.scheduler.{sorted(unknown)[0]}' (known: params, policy)")
        o.scheduler["policy"] = _choice(str(o.scheduler.get("policy", "")), SCHEDULERS, "optim.scheduler.policy")
        if not isinstance(o.scheduler.setdefault("params", {}), dict):
            raise HpoptError("train config: 'optim.scheduler.params' must be a mapping")
    _validate_fp_params(d.fp_params)
    zetas = d.fp_params.get("G4", {}).get("zetas", [])
    if d.angular == "g5" and any(z != int(z) or z < 1 for z in zetas):
        raise HpoptError(f"train config: 'dataset.fp_params.G4.zetas' must be whole numbers >= 1 with "
                         f"dataset.angular g5, got {zetas}; set 'dataset.angular: g4' for other zetas")


def _validate_fp_params(params: dict[str, Any]) -> None:
    expected = {"G2": ("etas", "rs_s"), "G4": ("etas", "zetas", "gammas")}
    for group, values in params.items():
        if group not in expected:
            raise HpoptError(f"train config: unknown key 'dataset.fp_params.{group}' (known: G2, G4)")
        if not isinstance(values, dict):
            raise HpoptError(f"train config: 'dataset.fp_params.{group}' must be a mapping")
        for key, numbers in values.items():
            full = f"dataset.fp_params.{group}.{key}"
            if key not in expected[group]:
                raise HpoptError(f"train config: unknown key '{full}' (known: {', '.join(expected[group])})")
            if not isinstance(numbers, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers
            ):
                raise HpoptError(f"train config: '{full}' must be a list of numbers, got {numbers!r}")
            values[key] = [float(v) for v in numbers]
    if "G2" not in params or not all(params["G2"].get(k) for k in expected["G2"]):
        raise HpoptError("train config: 'dataset.fp_params.G2' needs non-empty 'etas' and 'rs_s'")
    if "G4" in params and not all(params["G4"].get(k) for k in expected["G4"]):
        raise HpoptError("train config: 'dataset.fp_params.G4' needs non-empty 'etas', 'zetas' and 'gammas'")
    if any(g not in (1.0, -1.0) for g in params.get("G4", {}).get("gammas", [])):
        raise HpoptError("train config: 'dataset.fp_params.G4.gammas' must each be 1 or -1")


def parse_config(raw: dict[str, Any] | TrainConfig | None) -> TrainConfig:
    """Defaults filled in, every key checked; the input dict is never mutated."""
    if isinstance(raw, TrainConfig):
        raw = raw.as_dict()
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise HpoptError(f"train config must be a mapping, got {type(raw).__name__}")
    cfg = TrainConfig()
    for key, value in raw.items():
        if key == "trainer":
            cfg.trainer = checked(value, str, "train config: 'trainer'")
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise HpoptError(f"train config: '{key}' must be a mapping")
            _fill(getattr(cfg, key), value, f"{key}.")
        else:
            raise HpoptError(f"train config: unknown key '{key}' (known: {', '.join([*SECTIONS, 'trainer'])})")
    _validate(cfg)
    return cfg


def read_config_file(path: Path) -> dict[str, Any]:
    """A trainer config from YAML or JSON (JSON is YAML, so one parser reads both)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise HpoptError(f"trainer config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise HpoptError(f"{path}: not valid YAML/JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise HpoptError(f"{path}: a trainer config must be a mapping with model/optim/dataset/cmd keys")
    return data
