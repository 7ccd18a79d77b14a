"""Project-level contracts: every parameter is declared once (config.py); MLproject, recipes and CLI
flags are derived from those declarations and cannot drift; conda.yaml == requirements.txt."""
import ast
import dataclasses
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from fsku.config import STAGE_CONFIGS, field_kind, load_recipe
from fsku.steps import mlproject
from fsku.steps.args import config_from_namespace, parse_step_args

RECIPES = sorted((ROOT / "experiments").glob("*/*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipes_hold_only_what_differs_from_the_defaults(path):
    cfg = load_recipe(path)
    values = yaml.safe_load(path.read_text()) or {}
    assert set(values) <= {f.name for f in dataclasses.fields(cfg)}
    defaults = type(cfg)()
    same = sorted(k for k, v in values.items() if getattr(defaults, k) == v)
    assert not same, f"{path}: {same} equal the dataclass defaults; delete them from the recipe"


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


def test_mlproject_is_generated_from_the_configs():
    assert (ROOT / "MLproject").read_text(encoding="utf-8") == mlproject.render(), \
        "MLproject differs from src/fsku/config.py: run `fsku mlproject` and commit it"


def test_mlproject_check_fails_on_a_stale_file(tmp_path):
    stale = tmp_path / "MLproject"
    stale.write_text(mlproject.render().replace("chunk_size=480", "chunk_size=400"), encoding="utf-8")
    assert mlproject.main(["--out", str(stale), "--check"]) == 1
    assert mlproject.main(["--out", str(stale)]) == 0 and mlproject.main(["--out", str(stale), "--check"]) == 0
    hand_written = tmp_path / "hand" / "MLproject"
    hand_written.parent.mkdir()
    hand_written.write_text("name: mine\n")
    assert mlproject.main(["--out", str(hand_written)]) == 2 and hand_written.read_text() == "name: mine\n"


def test_mlproject_entry_points_take_a_recipe_and_any_field():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    assert set(spec["entry_points"]) == set(mlproject.ENTRY_POINTS)
    for step, entry in spec["entry_points"].items():
        assert set(entry["parameters"]) == {"recipe"}
        assert entry["command"] == f"python -m fsku.steps.{step} --recipe {{recipe}}"
        # MLflow passes an undeclared -P name=value as `--name value`: every field must parse that way
        cls = STAGE_CONFIGS[step]
        for f in dataclasses.fields(cls):
            kind, _ = field_kind(cls, f.name)
            if kind is bool:
                value = "true"
            elif kind in (int, float):
                value = "7"
            else:
                continue
            args = parse_step_args(["--recipe", "", f"--{f.name}", value], cls, step, None, progress_flag=True)
            assert getattr(args, f.name) == (True if kind is bool else kind(7)), (step, f.name)


def test_command_line_values_mlflow_style(tmp_path):
    from fsku.config import BuildKBConfig, DistillConfig

    def parse(cls, *argv):
        return config_from_namespace(parse_step_args(list(argv), cls, "t", None), cls)

    # "" means "not given": the dataclass default (or the recipe) applies
    assert parse(BuildKBConfig, "--chunk-size", "", "--labels", "").chunk_size == 480
    # MLflow float parameters arrive as "320.0"; ints stay ints
    cfg = parse(BuildKBConfig, "--chunk-size", "320.0", "--register_as", "none")
    assert cfg.chunk_size == 320 and isinstance(cfg.chunk_size, int) and cfg.register_as is None
    with pytest.raises(SystemExit):
        parse(BuildKBConfig, "--chunk-size", "320.5")
    with pytest.raises(SystemExit):
        parse(DistillConfig, "--qlora", "maybe")
    # a non-Optional string keeps "none" as a value (context=none is a real choice)
    from fsku.config import EvaluateConfig

    assert parse(EvaluateConfig, "--context", "none", "--kb", "none").context == "none"
    assert parse(EvaluateConfig, "--kb", "none").kb is None
    # recipe < flags; the recipe's stage must match the command's
    recipe = tmp_path / "build_kb.yaml"
    recipe.write_text("chunk_size: 320\nw_bm25: 0.9\n")
    cfg = parse(BuildKBConfig, "--recipe", str(recipe), "--w-bm25", "0.7")
    assert (cfg.chunk_size, cfg.w_bm25) == (320, 0.7)
    with pytest.raises(ValueError, match="a build_kb recipe, but this command needs a DistillConfig recipe"):
        parse(DistillConfig, "--recipe", str(recipe))
    with pytest.raises(ValueError, match="recipe .*nope/build_kb.yaml not found"):
        parse(BuildKBConfig, "--recipe", str(tmp_path / "nope" / "build_kb.yaml"))
    recipe.write_text("chunk_size: many\n")
    with pytest.raises(ValueError, match="build_kb.yaml: chunk_size must be an integer, got 'many'"):
        parse(BuildKBConfig, "--recipe", str(recipe))


def test_a_boolean_flag_alone_means_true():
    from fsku.config import DistillConfig

    def qlora(*argv):
        return config_from_namespace(parse_step_args(list(argv), DistillConfig, "t", None), DistillConfig).qlora

    assert qlora() is False and qlora("--qlora") is True and qlora("--qlora", "--lora-r", "8") is True
    assert qlora("--qlora", "false") is False and qlora("--qlora", "true") is True and qlora("--qlora", "") is False


def test_a_command_can_take_some_fields_of_a_config():
    """`fsku ingest` takes BuildKBConfig's per-file caps only: flags for those fields, no --recipe, and
    the command's own --out is not read as the config's `out`."""
    import argparse

    from fsku.config import BuildKBConfig
    from fsku.ingest import LIMIT_FIELDS
    from fsku.steps.args import add_config_args

    p = argparse.ArgumentParser()
    p.add_argument("--out")
    add_config_args(p, BuildKBConfig, only=LIMIT_FIELDS, recipe=False)
    a = p.parse_args(["--out", "docs.jsonl", "--max-pages-per-file", "7.0", "--max_file_mb", ""])
    assert not hasattr(a, "recipe") and not hasattr(a, "chunk_size")
    cfg = config_from_namespace(a, BuildKBConfig, only=LIMIT_FIELDS)
    assert (cfg.max_pages_per_file, cfg.max_file_mb, cfg.out) == (7, BuildKBConfig.max_file_mb, BuildKBConfig.out)
    with pytest.raises(SystemExit):
        p.parse_args(["--chunk-size", "100"])
    with pytest.raises(ValueError, match="max_pages_per_file must be >= 1"):
        config_from_namespace(p.parse_args(["--max-pages-per-file", "0"]), BuildKBConfig, only=LIMIT_FIELDS)
    with pytest.raises(TypeError, match=r"no field\(s\) \['nope'\]"):
        add_config_args(argparse.ArgumentParser(), BuildKBConfig, only=("nope",))


SHARED_FIELDS = ("backend", "dtype", "device", "max_model_len", "batch_size", "fusion", "w_bm25", "rrf_k", "lora_r",
                 "lora_alpha", "loss_type", "alpha", "beta", "embedding_model")


def _declarations(source: str) -> dict[str, list[str]]:
    """field name -> the classes whose body declares it (annotated assignments in class bodies)."""
    out: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    out.setdefault(stmt.target.id, []).append(node.name)
    return out


def test_shared_fields_are_declared_once():
    declared = _declarations((ROOT / "src" / "fsku" / "config.py").read_text(encoding="utf-8"))
    twice = {name: declared.get(name) for name in SHARED_FIELDS if len(declared.get(name, [])) != 1}
    assert not twice, f"declared more (or less) than once in config.py: {twice}"
    # the check itself can fail
    assert _declarations("class A:\n    x: int = 1\nclass B:\n    x: int = 2\n")["x"] == ["A", "B"]


def test_every_config_field_has_a_supported_type():
    for cls in STAGE_CONFIGS.values():
        for f in dataclasses.fields(cls):
            field_kind(cls, f.name)


def test_step_modules_accept_the_generated_command():
    for step in mlproject.ENTRY_POINTS:
        proc = subprocess.run([sys.executable, "-m", f"fsku.steps.{step}", "--recipe", "", "--help"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, (step, proc.stderr[-2000:])
        assert "--recipe" in proc.stdout


def test_every_config_field_has_help():
    for cls in STAGE_CONFIGS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
