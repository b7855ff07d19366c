"""Configuration: presets, file, environment precedence, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpopt.config import available_presets, load_config, render_toml
from hpopt.errors import HpoptError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hpopt.toml"
    path.write_text(text)
    return path


def test_presets_ship_for_pace_and_local() -> None:
    assert {"local", "pace-ice", "pace-phoenix"} <= set(available_presets())


def test_file_overrides_preset_and_env_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'preset = "pace-phoenix"\n[slurm]\naccount = "gts-me"\nmem = "32G"\n')
    config = load_config(path, env={"HPOPT_SLURM_MEM": "64G", "HPOPT_DB_PORT": "3307"})
    assert config.slurm.account == "gts-me"
    assert config.slurm.gpu_partition == "gpu-v100"  # from the preset
    assert config.slurm.mem == "64G"  # environment wins
    assert config.db.port == 3307
    assert config.source == str(path)


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[slurm]\npartiton = 'gpu'\n")
    with pytest.raises(HpoptError, match=r"hpopt.toml: unknown key 'slurm.partiton'"):
        load_config(path, env={})


def test_wrong_type_names_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[db]\nport = 'abc'\n")
    with pytest.raises(HpoptError, match=r"key 'db.port' must be int"):
        load_config(path, env={})


def test_bad_env_value_is_clear() -> None:
    with pytest.raises(HpoptError, match="HPOPT_DB_PORT must be an integer"):
        load_config(None, env={"HPOPT_DB_PORT": "x"})


def test_render_round_trips(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'preset = "pace-ice"\n'), env={})
    again = load_config(write(tmp_path, render_toml(config).replace("preset = ", "# preset = ")), env={})
    assert again.slurm == config.slurm and again.db == config.db
