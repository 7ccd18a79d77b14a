"""The package rules' facts and projections: the contenders table and user files, provenance, the
memory and time arithmetic by hand, the Python 3.10 check, token metering, and the GPU recipes'
dry runs (facts only, no weights)."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from fsku.config import PackageConfig, load_recipe
from fsku.package import BundleFacts, RulePolicy, check_rules
from fsku.package.facts import (
    Architecture,
    FactsError,
    ThroughputRow,
    eligibility_problems,
    load_facts,
    model_facts,
    model_key,
    provenance_from_tags,
)
from fsku.package.pycompat import check_source
from fsku.package.resources import GIB, folder_architecture, folder_tensors, memory_projection, pick_throughput, time_projection

TABLES = load_facts()
PERMITTED = TABLES.permitted_licences()
CUTOFF = "2025-07-31"


def test_the_table_cites_a_source_for_every_licence_and_date():
    assert len(TABLES.models) >= 12 and TABLES.throughput
    for key, entry in TABLES.models.items():
        for fact in ("license", "release_date"):
            if entry.get(fact) is not None:
                src = TABLES.sources[entry["sources"][fact]]
                assert src["url"] and src.get("quote"), (key, fact)
    for lic in TABLES.licences.values():
        assert TABLES.sources[lic.source]["url"]
    for row in TABLES.throughput:
        assert TABLES.sources[row.source]["url"] and row.prefill_tps > 0 and row.decode_tps > 0
    # the competition's rule: at least non-commercial use, so the non-commercial licences are in
    assert {"apache-2.0", "mit", "exaone", "cc-by-nc-4.0", "kr-public-law"} <= set(PERMITTED)
    assert "proprietary" not in PERMITTED


def test_unverified_licences_and_dates_are_refused_and_look_alikes_are_not_matched():
    ax = model_facts("skt/A.X-4.0-Light", TABLES)  # its licence was read from a derived model's card
    assert ax.license == "apache-2.0" and "license" in ax.unverified
    assert "licence unverified" in eligibility_problems(ax, "base model", PERMITTED, CUTOFF)[0]
    for entry in TABLES.models.values():  # every licence or date that passes came from a direct source
        facts = model_facts(entry["hub_id"], TABLES)
        if not eligibility_problems(facts, "m", PERMITTED, CUTOFF):
            assert not {"license", "release_date"} & set(facts.unverified), entry["hub_id"]
    # the owner is part of the key: a look-alike under another owner, or a folder of that name, is unknown
    assert not model_facts("someone/Qwen2.5-7B-Instruct", TABLES).known
    assert not model_facts("outputs/x/qwen2.5-7b-instruct", TABLES).known
    assert model_facts("qwen/qwen2.5-7b-instruct", TABLES).hub_id == "Qwen/Qwen2.5-7B-Instruct"  # hub ids ignore case


def test_midm_facts_pass_and_late_or_unlicensed_models_are_refused():
    midm = model_facts("K-intelligence/Midm-2.0-Base-Instruct", TABLES)
    assert (midm.parameters_b, midm.license, midm.release_date) == (11.5, "mit", "2025-07-04")
    assert eligibility_problems(midm, "base model", PERMITTED, CUTOFF) == []
    late = dataclasses.replace(midm, release_date="2025-08-06")
    assert eligibility_problems(late, "base model", PERMITTED, CUTOFF) == [
        "base model K-intelligence/Midm-2.0-Base-Instruct was released 2025-08-06, after the competition cutoff 2025-07-31"]
    # the cutoff day itself is allowed
    assert eligibility_problems(dataclasses.replace(midm, release_date=CUTOFF), "x", PERMITTED, CUTOFF) == []
    qwen3 = model_facts("Qwen/Qwen3-8B", TABLES)  # its licence is not confirmed by a stored source: refused
    assert "licence unverified" in eligibility_problems(qwen3, "distill teacher", PERMITTED, CUTOFF)[0]
    assert "no facts known" in eligibility_problems(model_facts("nobody/model", TABLES), "base model", PERMITTED, CUTOFF)[0]


def test_model_keys():
    assert model_key("offline:qwen2.5-coder-0.5b-instruct") == "qwen2.5-coder-0.5b-instruct"
    assert model_key("Qwen/Qwen2.5-Coder-0.5B-Instruct") == "qwen/qwen2.5-coder-0.5b-instruct"  # a hub id keeps its owner
    assert model_key("models/gguf/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf") == "qwen2.5-coder-1.5b-instruct"
    assert model_key("models/qwen2.5-coder-1.5b-instruct/") == "qwen2.5-coder-1.5b-instruct"
    assert model_facts("models/gguf/qwen2.5-coder-1.5b-instruct.gguf", TABLES).hub_id == "Qwen/Qwen2.5-Coder-1.5B-Instruct"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_user_file_adds_and_replaces_entries(tmp_path):
    mine = _write(tmp_path, "sources:\n  card: {url: https://huggingface.co/me/m, quote: 'License: apache-2.0'}\n"
                            "licenses:\n  - {id: my-licence, name: Mine, non_commercial_use: false, source: card}\n"
                            "models:\n  - hub_id: me/m-3b\n    license: my-licence\n    release_date: 2025-01-02\n"
                            "    sources: {license: card, release_date: card}\n"
                            "  - hub_id: K-intelligence/Midm-2.0-Base-Instruct\n    license: mit\n"
                            "    release_date: 2025-07-04\n    parameters_b: 11.5\n"
                            "    architecture: {layers: 48, kv_heads: 8, head_dim: 128}\n"
                            "    sources: {license: card, release_date: card, parameters_b: card, architecture: card}\n")
    tables = load_facts([mine])
    assert tables.files[-1] == str(mine)
    mine_model = model_facts("me/m-3b", tables)
    assert mine_model.release_date == "2025-01-02" and mine_model.source == str(mine)
    # a licence that does not allow non-commercial use is not among the permitted ones
    assert "licence 'my-licence' is not permitted" in eligibility_problems(mine_model, "base model",
                                                                           tables.permitted_licences(), CUTOFF)[0]
    assert model_facts("K-intelligence/Midm-2.0-Base-Instruct", tables).architecture == Architecture(48, 8, 128)


@pytest.mark.parametrize("text, message", [
    ("models:\n  - {name: x}\n", "models[0]: every model needs hub_id 'owner/name'"),
    ("models:\n  - {hub_id: a/b, licence: mit}\n", "models[0] (a/b): unknown field(s) ['licence']"),
    ("models:\n  - {hub_id: a/b, release_date: July 2025}\n", "release_date 'July 2025' is not a date YYYY-MM-DD"),
    ("models:\n  - {hub_id: a/b, license: mit}\n", "license 'mit' has no source"),
    ("models:\n  - {hub_id: a/b, license: mit, sources: {license: nowhere}}\n", "the source 'nowhere' of license"),
    ("models:\n  - {hub_id: a/b, architecture: {layers: 2}}\n", "architecture needs layers, kv_heads and head_dim"),
    ("models:\n  - {hub_id: a/b, parameters_b: -1}\n", "parameters_b must be a positive number"),
    ("models:\n  - {hub_id: a/b, tokenizer: x}\n", "tokenizer 'x' has no source"),
    ("models:\n  - {hub_id: a/b, unverified: [vocab]}\n", "unverified must list fact names"),
    ("models:\n  - {hub_id: a/b, aliases: name}\n", "aliases must be a list of names"),
    ("models:\n  - {hub_id: a/b, architecture: {layers: 2, kv_heads: null, head_dim: 4}}\n",
     "architecture.kv_heads must be a positive number"),
    ("sources:\n  s: {url: u}\nthroughput:\n  rows:\n    - {engine: optimized, precision: bf16, parameters_b: 1, "
     "decode_tps: 1, kind: measured, source: s}\n", "prefill_tps must be a positive number"),
    ("models: [\n", "not valid YAML"),
    ("- a\n", "expected a mapping"),
    ("modelz: []\n", "unknown section(s) ['modelz']"),
    ("schema: other/2\n", "schema 'other/2'"),
    ("sources:\n  s: {url: u}\nthroughput:\n  rows:\n    - {engine: tpu, precision: bf16, parameters_b: 1, prefill_tps: 1, "
     "decode_tps: 1, kind: measured, source: s}\n", "throughput.rows[0]: engine must be one of"),
    ("licenses:\n  - {id: x, non_commercial_use: maybe, source: spdx}\n", "non_commercial_use must be true or false"),
    ("torch_cuda:\n  - {torch: 2.13, cuda: 12.6}\n", "torch_cuda[0]: expected {torch: 'MAJOR.MINOR'"),
])
def test_bad_facts_files_name_the_file_entry_and_field(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(FactsError) as err:
        load_facts([path])
    assert message in str(err.value) and str(path) in str(err.value)
    with pytest.raises(FactsError, match="cannot read the contenders file"):
        load_facts([tmp_path / "missing.yaml"])


def test_provenance_from_lineage_tags():
    tags = {"base_model": "offline:qwen2.5-coder-0.5b-instruct", "teacher": "offline:qwen2.5-coder-1.5b-instruct",
            "synth_teacher": "Qwen/Qwen2.5-7B-Instruct", "synth_judge": "teacher"}
    assert provenance_from_tags(tags, "outputs/model") == [
        ("base model", "offline:qwen2.5-coder-0.5b-instruct"), ("distill teacher", "offline:qwen2.5-coder-1.5b-instruct"),
        ("synth_qa teacher", "Qwen/Qwen2.5-7B-Instruct"), ("synth_qa judge", "Qwen/Qwen2.5-7B-Instruct")]
    assert provenance_from_tags({}, "K-intelligence/Midm-2.0-Base-Instruct") == [
        ("base model", "K-intelligence/Midm-2.0-Base-Instruct")]


def test_an_ineligible_synth_qa_teacher_in_the_lineage_is_refused(tmp_path):
    from fsku.steps.package import policy_for, provenance

    late = _write(tmp_path, "sources:\n  news: {url: https://github.com/QwenLM/Qwen3, quote: '2025.08.06 ... 2507'}\n"
                            "models:\n  - hub_id: Qwen/Qwen3-4B-Instruct-2507\n    license: apache-2.0\n"
                            "    release_date: 2025-08-06\n    sources: {license: news, release_date: news}\n")
    cfg = PackageConfig(model="m", contenders=str(late))
    tables = load_facts(cfg.listed("contenders"))
    student = {"base_model": "offline:qwen2.5-coder-0.5b-instruct", "teacher": "offline:qwen2.5-coder-1.5b-instruct",
               "synth_teacher": "Qwen/Qwen3-4B-Instruct-2507", "synth_judge": "teacher"}
    models = provenance(cfg, student, tables, None)
    assert [role for role, _ in models] == ["base model", "distill teacher", "synth_qa teacher", "synth_qa judge"]
    problems = check_rules(BundleFacts(llms=["model"], models=models), policy_for(cfg, tables))
    assert problems == [
        "synth_qa teacher Qwen/Qwen3-4B-Instruct-2507 was released 2025-08-06, after the competition cutoff 2025-07-31",
        "synth_qa judge Qwen/Qwen3-4B-Instruct-2507 was released 2025-08-06, after the competition cutoff 2025-07-31"]
    # training data without a recorded generator is refused unless --other-models names one
    from fsku.steps.package import lineage_gaps

    gaps, warnings = lineage_gaps(cfg, {"data": "outputs/synth", "base_model": "b"}, models)
    assert gaps == ["training data outputs/synth has no recorded generator (no synth_teacher tag): name the model "
                    "that wrote it with --other-models"]
    assert lineage_gaps(dataclasses.replace(cfg, other_models="Qwen/Qwen2.5-7B-Instruct"), {"data": "d"}, models)[0] == []
    # a version registered before judges were recorded, and a folder with no lineage, are warned about
    assert "predates recorded synth_qa judges" in lineage_gaps(cfg, {"synth_teacher": "t"}, models)[1][0]
    assert "has no registry lineage" in lineage_gaps(cfg, {}, models)[1][0]
    # rule-written training data involves no model: it is not in the list (it is listed with the data)
    assert [r for r, _ in provenance(cfg, {**student, "synth_teacher": "rules:mc-bank", "synth_judge": ""}, tables,
                                     None)] == ["base model", "distill teacher"]


def test_memory_arithmetic_by_hand():
    arch = Architecture(layers=28, kv_heads=4, head_dim=128)  # Qwen2.5-7B: 57,344 bytes of K and V per token (bf16)
    assert arch.kv_bytes_per_token(2) == 57_344
    m = memory_projection(7.616e9, "bf16", arch, 4096, 8, 1.5, 24.0, gpu="RTX 4090")
    assert m.weights_gib == round(7.616e9 * 2 / GIB, 3) == 14.186
    assert m.kv_gib == round(57_344 * 4096 * 8 / GIB, 3) == 1.75
    assert m.total_gib == pytest.approx(14.186 + 1.75 + 1.5, abs=1e-3) and m.fits and m.complete
    assert m.lines[1] == "KV cache: 2 x 28 layers x 4 KV heads x 128 dims x 2 bytes x 4,096 tokens x 8 sequences = 1.75 GiB"
    over = memory_projection(14.77e9, "bf16", Architecture(48, 8, 128), 4096, 8, 1.5, 24.0)
    assert not over.fits and over.lines[-1].endswith("over by 11.01 GiB")  # 27.51 + 6.00 + 1.5 - 24
    four = memory_projection(11.5e9, "4bit", None, 4096, 8, 1.5, 24.0)
    assert four.weights_gib == round(11.5e9 * 0.5625 / GIB, 3) and four.kv_gib is None and not four.complete
    assert "KV cache: unknown" in four.lines[1]
    stored = memory_projection(1e9, "int8", None, 256, 1, 0.0, 24.0, stored_bytes=GIB)
    assert stored.weights_gib == 1.0
    with pytest.raises(ValueError, match="precision must be one of"):
        memory_projection(1e9, "int3", None, 256, 1, 0.0, 24.0)
    with pytest.raises(ValueError, match="must be positive"):
        memory_projection(1e9, "bf16", None, 0, 1, 0.0, 24.0)


def test_throughput_row_choice_and_time_by_hand():
    rows = [ThroughputRow("optimized", "bf16", 8.0, 9000, 50, "measured", "s"),
            ThroughputRow("optimized", "bf16", 1.0, 40000, 400, "estimate", "s"),
            ThroughputRow("transformers", "bf16", 7.0, 3000, 40, "measured-a100", "s")]
    row, factor = pick_throughput(rows, "optimized", "bf16", 4.0)  # log distance: 8 (0.69) beats 1 (1.39)
    assert row.parameters_b == 8.0 and factor == 2.0
    assert pick_throughput(rows, "optimized", "bf16", 0.001)[1] == 8.0  # the factor is limited
    assert pick_throughput(rows, "optimized", "4bit", 4.0) == (None, 1.0)
    row = ThroughputRow("optimized", "bf16", 2.0, 1000, 10, "measured", "s")
    profile = {"multiple_choice": {"read": 500, "decoded": 1}, "descriptive": {"read": 400, "decoded": 100}}
    t = time_projection(profile, {"multiple_choice": 10, "descriptive": 2}, row, 1.0, 5.0, 60.0)
    # 10 x (0.5 + 0.1) + 2 x (0.4 + 10) + 5 = 6 + 20.8 + 5
    assert t.seconds == 31.8 and t.fits
    assert "multiple_choice: 10 x (500 read / 1,000 + 1.0 decoded / 10.0) = 6 s" in t.lines
    slow = time_projection({"multiple_choice": {"read": 500, "decoded": 1}}, {"multiple_choice": 10, "descriptive": 2},
                           row, 0.5, 0.0, 10.0)
    # no descriptive measurement: priced like the dearer measured type (here the only one), and said so
    assert slow.seconds == pytest.approx(12 * (500 / 500 + 1 / 5)) and not slow.fits
    assert "descriptive: none in the measured sample; priced as multiple_choice" in slow.lines


def test_a_model_folder_gives_its_own_architecture_and_parameters(tiny_models):
    folder = Path(tiny_models["student"])
    cfg = json.loads((folder / "config.json").read_text())
    arch = folder_architecture(folder)
    assert arch.layers == cfg["num_hidden_layers"] and arch.kv_heads == cfg.get("num_key_value_heads",
                                                                                cfg["num_attention_heads"])
    elements, nbytes = folder_tensors(folder)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        tensors = [fh.get_tensor(k) for k in fh.keys()]
    assert elements == sum(x.numel() for x in tensors)
    assert nbytes == sum(x.numel() * x.element_size() for x in tensors)
    assert folder_tensors(folder / "missing") is None and folder_architecture(folder / "missing") is None


@pytest.mark.parametrize("source, what", [
    ("try:\n    pass\nexcept* ValueError:\n    pass\n", "does not parse as Python 3.10"),
    ("type Vector = list[float]\n", "does not parse as Python 3.10"),
    ("def first[T](xs: list[T]) -> T:\n    return xs[0]\n", "does not parse as Python 3.10"),
    ("x = {'a': 1}\ny = f\"{x[\"a\"]}\"\n", "does not parse as Python 3.10"),
    ("import tomllib\n", "module tomllib needs Python 3.11"),
    ("from typing import Self\n", "typing.Self needs Python 3.11"),
    ("import datetime as dt\nnow = dt.datetime.now(dt.UTC)\n", "datetime.UTC needs Python 3.11"),
    ("from enum import StrEnum\n", "enum.StrEnum needs Python 3.11"),
    ("from itertools import batched\n", "itertools.batched needs Python 3.12"),
    ("raise ExceptionGroup('x', [ValueError()])\n", "builtin ExceptionGroup needs Python 3.11"),
])
def test_python_310_check_finds_newer_syntax_and_names(source, what):
    found = check_source(source, "code/m.py")
    assert found and what in str(found[0]) and not found[0].guarded


@pytest.mark.skipif(sys.version_info < (3, 12), reason="PEP 701 f-strings only tokenize on Python 3.12+ (3.11's parser "
                                                         "rejects them, covered above)")
def test_pep701_fstrings_are_found_by_their_tokens_on_312():
    from fsku.package.pycompat import pep701_findings

    assert pep701_findings('x = {"a": 1}\ny = f"{x["a"]}"\n', "m.py")
    assert pep701_findings('y = f"{1 +\n2}"\n', "m.py")
    assert pep701_findings('z = f"""{"a"}"""\nw = f"{x!r:>10}"\n', "m.py") == []


def test_python_check_accepts_310_code_and_guarded_sites():
    ok = ("from __future__ import annotations\nimport datetime\nmatch 1:\n    case 1:\n        pass\n"
          "x: int | None = None\nnow = datetime.datetime.now(datetime.timezone.utc)\n")
    assert check_source(ok, "ok.py") == []
    guarded = check_source("try:\n    import tomllib  # py-compat: tomli fallback below\nexcept ImportError:\n"
                           "    import tomli as tomllib\n", "g.py")
    assert len(guarded) == 1 and guarded[0].guarded
    assert check_source("import tomllib\n", "m.py", target=(3, 11)) == []
    assert check_source("try:\n    pass\nexcept* ValueError:\n    pass\n", "m.py", target=(3, 11)) == []


def test_the_runtime_code_a_bundle_carries_parses_as_python_310():
    from fsku.steps.package import code_findings, runtime_code

    sources = runtime_code()
    assert "inference.py" in sources and "code/fsku/infer/predict.py" in sources
    assert not any(name.startswith(("code/fsku/steps/", "code/fsku/package/")) for name in sources)
    network, compat = code_findings(sources, (3, 10))
    assert compat == [] and all(f.guarded for f in network)


def test_a_newer_python_in_bundled_code_refuses_the_package(tiny_models, tmp_path):
    from fsku.steps.package import PackageRefused, run_step

    model = tmp_path / "m"
    import shutil

    shutil.copytree(tiny_models["student"], model)
    (model / "modeling_custom.py").write_text("import tomllib\n")
    cfg = PackageConfig(model=str(model), kb=None, out=str(tmp_path / "pkg"), verify="none")
    with pytest.raises(PackageRefused) as err:
        run_step(cfg, progress=False)
    assert err.value.problems == ["bundled code needs a newer Python than the target 3.10: model/modeling_custom.py:1: "
                                  "module tomllib needs Python 3.11"]
    assert run_step(dataclasses.replace(cfg, target_python="3.11"), progress=False)["problems"] == []


def test_a_bundle_over_the_disk_limit_and_a_bad_corpus_licence_are_refused(tiny_models, tmp_path):
    from fsku.steps.package import PackageRefused, run_step

    cfg = PackageConfig(model=str(tiny_models["student"]), kb=None, out=str(tmp_path / "pkg"), verify="none",
                        disk_gb=1e-6)
    with pytest.raises(PackageRefused, match=r"bundle of 0\.\d+ GB exceeds the 1e-06 GB disk"):
        run_step(cfg, progress=False)
    from fsku.steps.package import data_sources

    sources = data_sources(dataclasses.replace(cfg, corpus_license="proprietary"), {}, {"documents": 3, "corpus_sha256": "ab"})
    problems = check_rules(BundleFacts(llms=["model"], data=sources), RulePolicy(permitted_licenses=PERMITTED))
    assert len(problems) == 1 and "licence 'proprietary' is not permitted" in problems[0]


def test_over_24_gib_of_weights_and_kv_is_refused_in_a_dry_run(tmp_path):
    from fsku.steps.package import PackageRefused, run_step

    cfg = PackageConfig(model="Qwen/Qwen2.5-14B-Instruct", kb=None, out=str(tmp_path / "pkg"), dry_run=True)
    with pytest.raises(PackageRefused) as err:
        run_step(cfg, progress=False)
    [problem] = [p for p in err.value.problems if p.startswith("GPU memory")]
    assert problem.startswith("GPU memory: projected 35.01 GiB exceeds 24 GiB")  # 27.51 weights + 6.00 KV + 1.5
    assert "KV cache: 2 x 48 layers x 8 KV heads x 128 dims x 2 bytes x 4,096 tokens x 8 sequences = 6.00 GiB" in problem
    assert not (tmp_path / "pkg").exists()


def test_gpu_recipes_dry_run_on_facts_alone(tmp_path, capsys):
    """The Mi:dm 2.0 Base + vLLM recipe and the Qwen2.5 7B -> 1.5B distillation recipe: configs load and
    the rules pass without weights; nothing is written."""
    from fsku.steps.package import main, report, run_step

    for recipe in sorted((ROOT / "experiments").glob("gpu-*/*.yaml")):
        load_recipe(recipe)  # every GPU recipe loads into its stage's config
    midm = load_recipe(ROOT / "experiments/gpu-midm/package.yaml", {"dry_run": True, "out": str(tmp_path / "a")})
    out = run_step(midm, progress=False)
    assert out["problems"] == [] and out["models"][0][1]["hub_id"] == "K-intelligence/Midm-2.0-Base-Instruct"
    assert any("vLLM's gpu_memory_utilization 0.9 of 24 GiB" in line for line in out["resources"])
    assert any("KV cache" in w for w in out["warnings"])  # Mi:dm's layer numbers are not in a stored source
    lines = list(report(midm, out))
    assert "  base model: K-intelligence/Midm-2.0-Base-Instruct (K-intelligence/Midm-2.0-Base-Instruct, mit, released " \
           "2025-07-04)" in lines
    # the same model in bf16 does not fit vLLM's share of the card: refused with the arithmetic
    rc = main(["--recipe", str(ROOT / "experiments/gpu-midm/package.yaml"), "--dry-run", "--dry-run-precision", "bf16",
               "--out", str(tmp_path / "b")])
    assert rc == 2 and "GPU memory: projected 22.92 GiB exceeds 21.6 GiB" in capsys.readouterr().err
    qwen = load_recipe(ROOT / "experiments/gpu-distill-qwen/package.yaml",
                       {"dry_run": True, "base_model": "Qwen/Qwen2.5-1.5B-Instruct",
                        "other_models": "Qwen/Qwen2.5-7B-Instruct", "out": str(tmp_path / "c")})
    out = run_step(qwen, progress=False)
    llms = {role: m["hub_id"] for role, m in out["models"] if role != "KB embedder"}  # the KB's embedder when it exists
    assert out["problems"] == [] and llms == {"base model": "Qwen/Qwen2.5-1.5B-Instruct",
                                              "declared (--other-models)": "Qwen/Qwen2.5-7B-Instruct"}
    teacher, student = (model_facts(n, TABLES) for n in ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"))
    assert teacher.tokenizer == student.tokenizer == "qwen2.5"  # one tokenizer family: token-level distillation works
    assert not any((tmp_path / d).exists() for d in "abc")


def test_token_meter_counts_what_the_model_reads_and_writes(tiny_models):
    from fsku.llm import OptionRequest, load_llm
    from fsku.llm.base import TokenMeter, scores_continuations

    llm = load_llm(str(tiny_models["student"]), backend="transformers", device="cpu", dtype="float32", max_model_len=512)
    meter = TokenMeter(llm)
    request = OptionRequest(prefix="질문: 옳은 것은?\n", suffixes=["1 가\n2 나\n답:", "1 나\n2 가\n답:"], labels=["1", "2"])
    scores = meter.option_logprobs(request)
    assert scores.shape == (2, 2) and np.isfinite(scores).all()
    expected = llm.count_tokens(request.prefix) + sum(llm.count_tokens(s) for s in request.suffixes)
    assert meter.snapshot() == (expected, 0, 0)
    gens = meter.generate(["가나다", "라마"], max_new_tokens=3)
    assert meter.tokens_read == expected + llm.count_tokens("가나다") + llm.count_tokens("라마")
    assert meter.tokens_generated == sum(g.n_tokens for g in gens) > 0
    assert meter.decode_steps == max(g.n_tokens for g in gens) and meter.calls == 2
    # k samples of one prompt in one call: the prompt is read once (a prefix cache), decoded together
    before = meter.snapshot()
    samples = meter.generate(["가나다"] * 3, max_new_tokens=3, temperature=0.7, seed=1)
    assert meter.tokens_read - before[0] == llm.count_tokens("가나다")
    assert meter.decode_steps - before[2] == max(g.n_tokens for g in samples)
    meter.reset()
    assert meter.snapshot() == (0, 0, 0) and meter.calls == 0
    assert meter.fingerprint() == llm.fingerprint() and scores_continuations(meter) == scores_continuations(llm)


def test_token_profile_by_hand():
    from fsku.infer.predict import token_profile

    records = [{"question_type": "multiple_choice", "tokens_read": 100, "tokens_generated": 0, "path": "primary"},
               {"question_type": "multiple_choice", "tokens_read": 300, "tokens_generated": 0, "path": "fallback"},
               {"question_type": "multiple_choice", "tokens_read": 300, "duplicate_of": "Q1", "path": "primary"},
               {"question_type": "multiple_choice", "tokens_read": 0, "path": "none"},
               {"question_type": "descriptive", "tokens_read": 50, "tokens_generated": 40, "decode_steps": 10,
                "path": "primary"}]
    assert token_profile(records) == {
        "multiple_choice": {"questions": 2, "read": 200.0, "generated": 0.0, "decode_steps": 0.0},
        "descriptive": {"questions": 1, "read": 50.0, "generated": 40.0, "decode_steps": 10.0}}
    assert token_profile([]) == {}


def test_runtime_needs_read_the_pins_metadata():
    import re
    from importlib.metadata import metadata

    from fsku.steps.package import runtime_needs, runtime_warnings

    numpy = metadata("numpy")
    pin = f"numpy=={numpy['Version']}"
    floor = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", numpy["Requires-Python"]).groups())
    needs = runtime_needs([pin, "torch==2.1.0"], "3.9", "2.1.0")
    assert needs["python_pins"] == f">={floor[0]}.{floor[1]}" and needs["python_pins_because"] == [pin]
    assert not needs["pins_fit_target"] and f"needs Python >={floor[0]}.{floor[1]} ({pin})" in runtime_warnings(needs)[0]
    assert runtime_needs([pin], f"{floor[0]}.{floor[1]}")["pins_fit_target"]
    # a pin that is not what is installed here is not read, and said so; a torch pin unlike the image's is warned about
    other = runtime_needs(["numpy==0.0.1", "torch==2.13.0"], "3.10", "2.1.0")
    assert other["unchecked_pins"][0] == "numpy==0.0.1" and other["pins_fit_target"]
    assert any("pins torch 2.13.0, the target image has 2.1.0" in w for w in runtime_warnings(other))
    # the CUDA builds PyTorch publishes for the pin, from the facts table (torch 2.13: 12.6 and 13.0, no 11.8)
    cuda = runtime_needs(["torch==2.13.0"], "3.10", "2.1.0", TABLES.torch_cuda)
    assert cuda["torch_cuda_builds"] == ["12.6", "13.0"] and "CUDA 12.6, 13.0" in runtime_warnings(cuda)[0]


def test_predict_records_the_tokens_each_question_cost(tiny_models, tmp_path):
    """Through the orchestrator: every answered question carries its tokens, a descriptive one what it
    generated, the stats the per-type means the package projects from, and a resumed run the same."""
    import csv

    from fsku.config import PredictConfig
    from fsku.infer.predict import predict

    test = tmp_path / "test.csv"
    with test.open("w", encoding="utf-8-sig", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows([("ID", "Question"), ("Q1", "옳은 것은?\n1 가\n2 나\n3 다\n4 라"),
                                                        ("Q2", "전자금융거래의 정의를 설명하세요.")])
    cfg = PredictConfig(model=str(tiny_models["student"]), backend="transformers", device="cpu", dtype="float32",
                        context="none", kb=None, max_new_tokens=4, cache_dir="")
    result = predict(cfg, test, tmp_path / "sub.csv", progress=False)
    by_id = {r["ID"]: r for r in result.records}
    assert by_id["Q1"]["tokens_read"] > 0 and by_id["Q1"]["tokens_generated"] == 0
    assert by_id["Q2"]["tokens_read"] > 0 and by_id["Q2"]["tokens_generated"] > 0  # every attempt, re-asks included
    s = result.stats
    assert s["tokens_read"] == by_id["Q1"]["tokens_read"] + by_id["Q2"]["tokens_read"]
    assert s["tokens_read_per_multiple_choice"] == by_id["Q1"]["tokens_read"]
    assert s["tokens_generated_per_descriptive"] == by_id["Q2"]["tokens_generated"]
    assert 0 < s["tokens_decode_steps_per_descriptive"] == by_id["Q2"]["decode_steps"] <= by_id["Q2"]["tokens_generated"]
    from fsku.steps.package import measured_profile

    assert measured_profile(s) == {"multiple_choice": {"read": by_id["Q1"]["tokens_read"], "decoded": 0.0},
                                   "descriptive": {"read": by_id["Q2"]["tokens_read"],
                                                   "decoded": by_id["Q2"]["decode_steps"]}}


def test_a_method_that_needs_calibration_refuses_a_recipe_without_it():
    from fsku.config import QuantizeConfig

    with pytest.raises(ValueError, match="method gptq needs calibration texts"):
        QuantizeConfig(method="gptq")
    assert load_recipe(ROOT / "experiments/gpu-midm/quantize.yaml").calibration == "outputs/lawkb"


def test_a_reranker_is_bundled_from_a_folder_and_a_second_llm_is_refused(tiny_models, tmp_path):
    from fsku.steps.package import copy_reranker, reranker_problems

    assert reranker_problems({"reranker": "none"}) == [] and reranker_problems({"reranker": "llm"}) == []
    assert "is a second LLM" in reranker_problems({"reranker": "llm", "reranker_model": "Qwen/Qwen2.5-7B-Instruct"})[0]
    assert "not a local model folder" in reranker_problems({"reranker": "cross-encoder",
                                                             "reranker_model": "BAAI/bge-reranker-v2-m3"})[0]
    folder = str(tiny_models["student"])  # any folder with a config.json stands in for a cross-encoder here
    settings = {"reranker": "cross-encoder", "reranker_model": folder}
    assert reranker_problems(settings) == []
    bundled = copy_reranker(settings, tmp_path)
    assert bundled["reranker_model"] == f"models/reranker-{Path(folder).name}"
    assert (tmp_path / bundled["reranker_model"] / "config.json").is_file() and settings["reranker_model"] == folder


def test_decode_steps_follow_the_backend_batches():
    from fsku.llm.base import Generation, TokenMeter

    class Scripted:
        name, batch_size = "transformers", 2

        def count_tokens(self, text):
            return len(text)

        def generate(self, prompts, *args, **kwargs):
            return [Generation("x" * n, n, 0.0, False) for n in (5, 3, 4, 1, 2)[:len(prompts)]]

    meter = TokenMeter(Scripted())
    meter.generate(["ab"] * 5)
    # batches of 2 decode one after another: max(5, 3) + max(4, 1) + 2; the five identical prompts read once
    assert (meter.tokens_read, meter.tokens_generated, meter.decode_steps) == (2, 15, 11)
    Scripted.name = "vllm"  # vLLM schedules the whole call together
    meter.reset()
    meter.generate(["ab", "cd", "ef", "gh", "ij"])
    assert (meter.tokens_read, meter.decode_steps) == (10, 5)
    assert model_key("C:\\models\\x") == "x" and model_key("C:/x") == "x"  # Windows paths are paths
