"""The project configuration: one cluster profile read from `hpopt.toml`.

Precedence (later wins): built-in defaults < preset named by `preset = "..."` < the project file
(`--config`, `$HPOPT_CONFIG`, or `./hpopt.toml`) < environment variables `HPOPT_<SECTION>_<KEY>`
(e.g. `HPOPT_SLURM_ACCOUNT`, `HPOPT_DB_PORT`) and `HPOPT_RUN_DIR`.
Unknown keys and wrong types are rejected with one line naming the key and the file, because a
typo in a partition name otherwise surfaces an hour later as a pending job.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from hpopt.errors import HpoptError
from hpopt.typecheck import checked

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_CONFIG_NAME = "hpopt.toml"


@dataclass
class SlurmProfile:
    """How jobs are submitted: account, partitions, limits and the shell prelude of every job."""

    account: str = ""
    qos: str = ""
    cpu_partition: str = ""
    gpu_partition: str = ""
    gpu_gres: str = "gpu:1"
    cpus_per_task: int = 1
    mem: str = "4G"
    worker_time: str = "4:00:00"
    db_time: str = "8:00:00"
    prelude: list[str] = field(default_factory=list)
    extra_sbatch: list[str] = field(default_factory=list)


@dataclass
class DbProfile:
    """Where and how the MariaDB server job runs."""

    datadir: str = ""  # empty: <run_dir>/mariadb (persistent, never a node's /tmp)
    port: int = 0  # 0: pick a free port on the node at start
    bind: str = "node"  # "node": the node's address; "loopback": 127.0.0.1 only
    max_connections: int = 0  # 0: sized from the number of workers
    renew_before_s: int = 300  # Slurm sends USR1 this long before the time limit
    start_timeout_s: int = 300
    mariadbd: str = "mariadbd"
    module_hint: str = "install MariaDB (apt-get install mariadb-server) or `module load mariadb`"


@dataclass
class Config:
    """Everything hpopt knows about where it runs."""

    preset: str = ""
    run_dir: str = ".hpopt"
    slurm: SlurmProfile = field(default_factory=SlurmProfile)
    db: DbProfile = field(default_factory=DbProfile)
    source: str = "<defaults>"  # the file the values came from, for error messages

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir).expanduser().resolve()


SECTIONS = {"slurm": SlurmProfile, "db": DbProfile}


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def _apply(target: Any, values: dict[str, Any], prefix: str, source: str) -> None:
    hints = get_type_hints(type(target))
    names = {f.name for f in dataclasses.fields(target)} - {"source"}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise HpoptError(f"{source}: unknown key '{full}' (known: {', '.join(sorted(names))})")
        if key in SECTIONS and prefix == "":
            if not isinstance(value, dict):
                raise HpoptError(f"{source}: '{full}' must be a table [{key}]")
            _apply(getattr(target, key), value, f"{key}.", source)
        else:
            setattr(target, key, checked(value, hints[key], f"{source}: key '{full}'"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise HpoptError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise HpoptError(f"{path}: not valid TOML ({exc})") from None


def _parse_env(raw: str, expected: Any, key: str) -> Any:
    source = "environment"
    if expected is int:
        try:
            return int(raw)
        except ValueError:
            raise HpoptError(f"{source}: {key} must be an integer, got {raw!r}") from None
    if expected is bool:
        return raw.lower() in ("1", "true", "yes", "on")
    if expected == list[str]:
        return [line for line in raw.split(";") if line.strip()]
    return raw


def _apply_env(config: Config, env: dict[str, str]) -> None:
    if env.get("HPOPT_RUN_DIR"):
        config.run_dir = env["HPOPT_RUN_DIR"]
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            var = f"HPOPT_{section.upper()}_{f.name.upper()}"
            if var in env:
                setattr(getattr(config, section), f.name, _parse_env(env[var], hints[f.name], var))


def load_preset(name: str) -> dict[str, Any]:
    path = PRESETS_DIR / f"{name}.toml"
    if not path.exists():
        raise HpoptError(f"unknown preset '{name}' (available: {', '.join(available_presets())})")
    return _read_toml(path)


def load_config(path: Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Build the effective configuration; `path=None` means `$HPOPT_CONFIG` or ./hpopt.toml if present."""
    env = dict(os.environ) if env is None else env
    if path is None and env.get("HPOPT_CONFIG"):
        path = Path(env["HPOPT_CONFIG"])
    if path is None and Path(DEFAULT_CONFIG_NAME).exists():
        path = Path(DEFAULT_CONFIG_NAME)
    config = Config()
    data = _read_toml(path) if path is not None else {}
    preset = data.get("preset", "")
    if preset:
        if not isinstance(preset, str):
            raise HpoptError(f"{path}: key 'preset' must be str")
        _apply(config, load_preset(preset), "", f"preset {preset}")
    if path is not None:
        _apply(config, data, "", str(path))
        config.source = str(path)
    _apply_env(config, env)
    return config


def render_toml(config: Config) -> str:
    """The effective configuration as TOML, for `hpopt config show`."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return str(value)
        if isinstance(value, list):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"# effective configuration (from {config.source})"]
    lines += [f"preset = {fmt(config.preset)}", f"run_dir = {fmt(config.run_dir)}"]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        for f in dataclasses.fields(getattr(config, section)):
            lines.append(f"{f.name} = {fmt(getattr(getattr(config, section), f.name))}")
    return "\n".join(lines) + "\n"
