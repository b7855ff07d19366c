"""Configuration: presets, file, environment precedence, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hpopt.config import available_presets, load_config, render_toml
from hpopt.errors import HpoptError
from hpopt.train.config import parse_config
from hpopt.typecheck import checked


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


def test_both_configs_refuse_a_wrong_type_with_the_same_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[slurm]\ncpus_per_task = true\n")
    with pytest.raises(HpoptError) as profile:
        load_config(path, env={})
    with pytest.raises(HpoptError) as trial:
        parse_config({"optim": {"epochs": True}})
    assert str(profile.value) == f"{path}: key 'slurm.cpus_per_task' must be int, got bool (True)"
    assert str(trial.value) == "train config: 'optim.epochs' must be int, got bool (True)"


@pytest.mark.parametrize("value, expected, result", [
    (3, float, 3.0), (True, bool, True), ((1, 2), list[int], [1, 2]), (("a",), list[str], ["a"]),
    (None, dict[str, Any], {}), (int, str, "int"),  # amptorch passes classes (torch.nn.Tanh) for names
])
def test_checker_accepts_and_converts(value: Any, expected: Any, result: Any) -> None:
    out = checked(value, expected, "x")
    assert out == result and type(out) is type(result)


def test_checker_copies_what_it_keeps() -> None:
    nested = {"G2": {"etas": [1.0]}}
    out = checked(nested, dict[str, Any], "x")
    out["G2"]["etas"].append(2.0)
    assert nested == {"G2": {"etas": [1.0]}}


@pytest.mark.parametrize("value, expected", [
    (True, int), (1, bool), ("1", int), (False, float), ([1, "a"], list[int]), ([True], list[int]),
    ("ab", list[str]), ([], dict[str, Any]), (1.5, int),
])
def test_checker_refuses_with_one_line_naming_the_key(value: Any, expected: Any) -> None:
    with pytest.raises(HpoptError, match=r"^where 'k' must be \w+, got \w+ \(.*\)$"):
        checked(value, expected, "where 'k'")


def test_bad_env_value_is_clear() -> None:
    with pytest.raises(HpoptError, match="HPOPT_DB_PORT must be an integer"):
        load_config(None, env={"HPOPT_DB_PORT": "x"})


def test_render_round_trips(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'preset = "pace-ice"\n'), env={})
    again = load_config(write(tmp_path, render_toml(config).replace("preset = ", "# preset = ")), env={})
    assert again.slurm == config.slurm and again.db == config.db
