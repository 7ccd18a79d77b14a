"""Project-level contracts: recipes load, conda.yaml == requirements.txt, MLproject params are config fields."""
import dataclasses

import pytest
import yaml

from fsku.config import STAGE_CONFIGS, load_recipe

from conftest import ROOT

RECIPES = sorted((ROOT / "experiments").glob("*/*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_keys_are_exactly_config_fields(path):
    cfg = load_recipe(path)
    keys = set(yaml.safe_load(path.read_text()))
    assert keys <= {f.name for f in dataclasses.fields(cfg)}


def test_unknown_recipe_key_is_rejected(tmp_path):
    bad = tmp_path / "build_kb.yaml"
    bad.write_text("chunk_sise: 100\n")
    with pytest.raises(ValueError, match=r"unknown BuildKBConfig field\(s\) \['chunk_sise'\]"):
        load_recipe(bad)


def _pins(lines):
    return sorted(ln.strip() for ln in lines if "==" in ln and not ln.strip().startswith("#"))


def test_conda_env_matches_requirements():
    req = _pins((ROOT / "requirements.txt").read_text().splitlines())
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert _pins(pip_section) == req


def test_mlproject_parameters_are_config_fields():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    for step, entry in spec["entry_points"].items():
        fields = {f.name for f in dataclasses.fields(STAGE_CONFIGS[step])}
        assert set(entry["parameters"]) <= fields
        for name in entry["parameters"]:
            assert "{" + name + "}" in entry["command"]


def test_every_config_field_has_help():
    for cls in STAGE_CONFIGS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
