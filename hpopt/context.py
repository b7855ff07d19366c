"""Process-wide CLI context: which config file the user pointed at (set once by the root callback)."""

from __future__ import annotations

from pathlib import Path

from hpopt.config import Config, load_config

_config_path: Path | None = None


def set_config_path(path: Path | None) -> None:
    global _config_path
    _config_path = path


def config_path() -> Path | None:
    return _config_path


def current_config() -> Config:
    """The effective configuration for this invocation."""
    return load_config(_config_path)
