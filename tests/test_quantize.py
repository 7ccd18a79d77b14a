"""quantize: method registry, quantize -> save -> reload -> generate on a tiny model, and the
before/after math (hand-computed values)."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fsku import quantize as Q

# relative max |logit difference| (to the original's largest logit) a method may cost on the tiny model
TOLERANCE = {"int8": 0.02, "bnb-8bit": 0.03, "bnb-nf4": 0.25}  # measured: 0.008, 0.012, 0.113


def test_perplexity_by_hand():
    assert Q.perplexity([[math.log(0.5), math.log(0.25)]]) == pytest.approx(math.sqrt(8))
    # token-weighted: one 1-token sequence at p=1 and a 3-token one at p=1/2 -> exp(3 ln2 / 4)
    assert Q.perplexity([[0.0], [math.log(0.5)] * 3]) == pytest.approx(2 ** 0.75)
    with pytest.raises(ValueError, match="perplexity needs at least one token"):
        Q.perplexity([[], []])


def test_latency_summary_and_ratios():
    s = Q.latency_summary(list(range(1, 21)))
    assert s["latency_mean_s"] == pytest.approx(10.5) and s["latency_p95_s"] == pytest.approx(19.05)
    assert Q.ratios({"a": 2.0, "b": 0.0, "c": 1.0}, {"a": 1.0, "b": 3.0}, ["a", "b", "c"]) == {"a_ratio": 0.5}
    with pytest.raises(ValueError, match="no latencies"):
        Q.latency_summary([])


def test_max_logit_difference():
    assert Q.max_logit_difference(np.array([[2.0, -4.0]]), np.array([[2.5, -4.0]])) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="shapes differ"):
        Q.max_logit_difference(np.zeros(3), np.zeros(4))


def test_unknown_and_missing_backends_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="choose one of"):
        Q.get_method("int3")
    monkeypatch.setattr(Q.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install torchao"):
        Q.get_method("int8")


def test_gptq_needs_its_backend_or_calibration(tiny_models, tmp_path):
    if Q.importlib.util.find_spec("gptqmodel") is None:
        with pytest.raises(ImportError, match="gptqmodel"):
            Q.quantize_model(tiny_models["student"], "gptq", tmp_path / "q")
    else:
        with pytest.raises(ValueError, match="calibration"):
            Q.quantize_model(tiny_models["student"], "gptq", tmp_path / "q")


@pytest.fixture(scope="module")
def wide_tiny(tiny_models, tmp_path_factory):
    """A tiny model whose layer widths are multiples of 64 (bitsandbytes' CPU 4-bit kernels need that)."""
    from fsku.llm.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("wide") / "m", tiny_models["tokenizer"], hidden=128, layers=2, heads=4)


def _logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu").eval()
    with torch.no_grad():
        return model(ids).logits.float().numpy()


@pytest.mark.parametrize("method", ["int8", "bnb-8bit", "bnb-nf4"])
def test_cpu_methods_quantize_save_reload_and_generate(wide_tiny, tmp_path, method):
    pytest.importorskip(Q.METHODS[method].packages[0])
    from transformers import AutoTokenizer

    from fsku.llm import load_llm

    out = Q.quantize_model(wide_tiny, method, tmp_path / method)
    info = json.loads((out / Q.QUANT_INFO_FILE).read_text())
    assert info["method"] == method and info["bits"] == Q.METHODS[method].bits
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    assert Q.folder_size_mb(out) < Q.folder_size_mb(wide_tiny)
    ids = AutoTokenizer.from_pretrained(wide_tiny)("전자금융거래법 제1조 정보보호", return_tensors="pt").input_ids
    diff = Q.max_logit_difference(_logits(wide_tiny, ids), _logits(out, ids))
    assert 0 < diff <= TOLERANCE[method], diff
    llm = load_llm(str(out), backend="transformers")
    gen = llm.generate(["전자금융"], max_new_tokens=3)[0]
    assert gen.n_tokens >= 1


def test_gptq_quantizes_on_cpu_and_loads_through_the_backend(wide_tiny, tmp_path):
    """Runs where the gptq extra is installed (pip install 'fsku[gptq]'); the CI image has no gptqmodel."""
    pytest.importorskip("gptqmodel", reason="the gptq extra (gptqmodel) is not installed")
    from transformers import AutoTokenizer

    from fsku.llm import load_llm

    calibration = [f"전자금융거래법 제{i}조 안전성 확보 의무와 정보보호 최고책임자의 지정에 관한 설명입니다. " * 3
                   for i in range(48)]
    out = Q.quantize_model(wide_tiny, "gptq", tmp_path / "gptq", calibration=calibration)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    llm = load_llm(str(out), backend="transformers", dtype="float32")
    ids = AutoTokenizer.from_pretrained(wide_tiny)("전자금융거래법 제1조 정보보호", return_tensors="pt").input_ids
    with torch.no_grad():
        got = llm.model(ids).logits.float().numpy()
    assert 0 < Q.max_logit_difference(_logits(wide_tiny, ids), got) <= TOLERANCE["bnb-nf4"]
    assert llm.generate(["전자금융"], max_new_tokens=3)[0].n_tokens >= 1


def test_a_lora_adapter_is_merged_before_quantizing(wide_tiny, tmp_path):
    pytest.importorskip("torchao")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(wide_tiny),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(wide_tiny).save_pretrained(adapter)
    merged = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(merged)
    out = Q.quantize_model(adapter, "int8", tmp_path / "q")
    ids = torch.tensor([[5, 17, 42, 99]])
    # close to the merged model, and further from the base than quantization alone would be
    assert Q.max_logit_difference(_logits(merged, ids), _logits(out, ids)) <= TOLERANCE["int8"]
    assert Q.max_logit_difference(_logits(wide_tiny, ids), _logits(out, ids)) > TOLERANCE["int8"]


def test_a_merged_adapter_is_written_staged_and_replaces_only_a_model_folder(wide_tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fsku.outputs import SENTINEL, OutputRefused

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(wide_tiny),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(wide_tiny).save_pretrained(adapter)
    work = tmp_path / "q"
    (work / "merged").mkdir(parents=True)
    (work / "merged" / "notes.txt").write_text("mine\n")  # not a model folder: refused, left as it was
    with pytest.raises(OutputRefused, match="merged model folder .*merged is a non-empty folder without config.json"):
        Q.merged_source(adapter, work, torch.float32)
    assert [p.name for p in (work / "merged").iterdir()] == ["notes.txt"]
    (work / "merged" / "notes.txt").unlink()
    # an earlier merge (restarted after a crash) with a shard the new one does not write: nothing of it survives
    (work / "merged" / "config.json").write_text("{}")
    (work / "merged" / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    out = Q.merged_source(adapter, work, torch.float32)
    assert out == work / "merged" and (out / "config.json").read_text() != "{}"
    names = {p.name for p in out.iterdir()}
    assert "model-00002-of-00002.safetensors" not in names and SENTINEL not in names
    assert sorted(p.name for p in work.iterdir()) == ["merged"]


def test_bad_source_and_device_are_clear(tmp_path, wide_tiny):
    pytest.importorskip("torchao")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        Q.quantize_model(tmp_path, "int8", tmp_path / "q")
    with pytest.raises(ValueError, match="runs on"):
        Q.quantize_model(wide_tiny, "int8", tmp_path / "q", device="mps")


# ---------------------------------------------------------------- comparison and the step

def _gold(rows):
    from fsku.evaluate.fsku_metric import GoldRow

    return [GoldRow(i, q, a, "") for i, q, a in rows]


def test_comparison_set_from_labelled_rows():
    rows = _gold([("m1", "보고 기한은 언제인가?\n1 즉시\n2 7일\n3 한 달\n4 없음", "2 7일"),
                  ("d1", "전자금융거래의 정의를 설명하시오.", "전자적 장치를 통한 금융거래"),
                  ("d2", "빈 답은 비교에서 빠진다.", "")])
    data = Q.comparison_set(rows, gen_prompts=4)
    assert [(q.question_id, g) for q, g in data.mc] == [("m1", 2)]
    assert [a for _, a in data.references] == ["2", "전자적 장치를 통한 금융거래"]
    # the multiple-choice prompt shows the options in their original order, without the split sentinel
    assert "1 즉시\n2 7일" in data.references[0][0][-1]["content"] and "\u2063" not in data.references[0][0][-1]["content"]
    assert len(data.generation) == 2  # the descriptive question, then the multiple-choice stem as an explanation
    with pytest.raises(ValueError, match="m9: answer '7' is not one of its options"):
        Q.comparison_set(_gold([("m9", "고르시오.\n1 가\n2 나\n3 다", "7")]))


def test_compare_counts_lost_and_gained_answers():
    before = {"metrics": {"mc_accuracy": 0.5, "size_mb": 100.0, "latency_mean_s": 2.0}, "choices": [1, 2, 3, 4]}
    after = {"metrics": {"mc_accuracy": 0.5, "size_mb": 25.0, "latency_mean_s": 3.0}, "choices": [1, 3, 3, 1]}
    out = Q.compare(before, after, gold=[1, 2, 4, 1])
    # q2: right -> wrong (lost); q4: wrong -> right (gained); q3: wrong -> wrong, unchanged
    assert (out["correct_lost"], out["correct_gained"], out["answers_changed"]) == (1, 1, 2)
    assert out["size_mb_ratio"] == 0.25 and out["latency_mean_s_ratio"] == 1.5 and out["mc_accuracy_ratio"] == 1.0
    assert out["original_size_mb"] == 100.0 and out["quantized_size_mb"] == 25.0
    with pytest.raises(ValueError, match="gold options"):
        Q.compare(before, after, gold=[1, 2])


@pytest.mark.slow
def test_quantize_step_measures_registers_and_the_version_loads(wide_tiny, tmp_path, monkeypatch):
    """The whole step on a tiny model: register a 'student', quantize it from its models:/ URI, get
    the comparison in MLflow and a registered quantized version that loads through load_llm."""
    import mlflow

    from fsku import tracking
    from fsku.config import QuantizeConfig
    from fsku.llm import load_llm
    from fsku.steps.quantize import run_step as quantize_step

    monkeypatch.setenv("FSKU_MODELS_DIR", str(tmp_path / "models"))
    with tracking.run("distill", {}):
        version = tracking.register_student(wide_tiny, "tiny-student", {"base_model": "tiny", "loss_type": "sft"})
    mlflow.MlflowClient().set_registered_model_alias("tiny-student", "champion", version)
    cfg = QuantizeConfig(model="models:/tiny-student@champion", method="int8", out=str(tmp_path / "q"),
                         dtype="float32", device="cpu", max_questions=12, gen_prompts=2, gen_tokens=8, isolate=False,
                         register_as="tiny-student")
    result = quantize_step(cfg, progress=False)
    s = result["summary"]
    n_mc = s["original_n_mc"]
    assert n_mc >= 1 and s["quantized_n_mc"] == n_mc
    assert 0 <= s["correct_lost"] <= n_mc \
        and s["quantized_mc_correct"] == s["original_mc_correct"] - s["correct_lost"] + s["correct_gained"]
    assert s["original_perplexity"] > 1 and s["quantized_perplexity"] > 1
    assert s["quantized_size_mb"] < s["original_size_mb"]
    assert set(result["table"]["metric"]) >= {"mc_accuracy", "perplexity", "latency_p95_s", "tokens_per_s", "size_mb",
                                              "peak_rss_mb"}
    run = mlflow.get_run(result["run_id"])
    assert run.data.metrics["cost/size_mb_ratio"] == pytest.approx(s["size_mb_ratio"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result["run_id"], "plots")}
    assert "plots/quantize_comparison.png" in artifacts
    mv = mlflow.MlflowClient().get_model_version("tiny-student", result["version"])
    assert mv.tags["quantization"] == "int8" and mv.tags["bits"] == "8" and mv.tags["source_version"] == version
    assert mv.tags["base_model"] == "tiny" and mv.tags["source"] == "models:/tiny-student@champion"
    # the registered quantized version loads through the ordinary backend, its URI resolved by tracking
    llm = load_llm(tracking.resolve_model_uri(f"models:/tiny-student/{result['version']}"), backend="transformers",
                   dtype="float32")
    assert json.loads((Path(llm.model_id) / Q.QUANT_INFO_FILE).read_text())["method"] == "int8"
    assert llm.generate([llm.render_chat([{"role": "user", "content": "보안"}])], max_new_tokens=3)[0].n_tokens >= 1
    # quantizing a quantized version is refused; a second run reuses the measurements
    with pytest.raises(ValueError, match="already quantized"):
        quantize_step(dataclasses.replace(cfg, model=f"models:/tiny-student/{result['version']}"), progress=False)
    again = quantize_step(dataclasses.replace(cfg, register_as=""), progress=False)
    assert again["summary"]["original_latency_mean_s"] == s["original_latency_mean_s"]


def test_unknown_registered_model_is_a_clear_error(tmp_path, monkeypatch):
    from fsku import tracking
    from fsku.llm import load_llm
    from fsku.llm.resolve import resolve_model

    monkeypatch.setenv("FSKU_MODELS_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="not found in the registry"):
        tracking.resolve_model_uri("models:/no-such-model@champion")
    with pytest.raises(ValueError, match="expected models:/<name>/<version|latest>"):
        tracking.resolve_model_uri("models:/just-a-name")
    # the LLM layer does not talk to the registry: an unresolved URI says where to resolve it
    for call in (lambda: resolve_model("models:/x@champion", tmp_path), lambda: load_llm("models:/x/1")):
        with pytest.raises(ValueError, match="fsku.tracking.resolve_model_uri"):
            call()
    assert tracking.resolve_model_uri("offline:x") == "offline:x" and tracking.resolve_model_uri(None) is None


def test_run_isolated_returns_the_child_result_and_its_errors(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\0" * 2**20)
    assert Q.run_isolated(Q.folder_size_mb, tmp_path) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no latencies"):
        Q.run_isolated(Q.latency_summary, [])


def test_peak_memory_of_a_spawned_child_is_its_own():
    """ru_maxrss survives exec, so a child would report the parent's peak; VmHWM does not."""
    ballast = np.ones(300 * 2**20 // 8)  # 300 MiB touched in the parent
    parent = Q.peak_memory_mb()["peak_rss_mb"]
    child = Q.run_isolated(Q.peak_memory_mb)["peak_rss_mb"]
    assert parent >= 300 and child < parent - 250, (parent, child)
    del ballast


@pytest.mark.slow
def test_quantize_step_merges_a_lora_adapter_once(wide_tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fsku.config import QuantizeConfig
    from fsku.steps.quantize import run_step as quantize_step

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(wide_tiny),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(wide_tiny).save_pretrained(tmp_path / "adapter")
    cfg = QuantizeConfig(model=str(tmp_path / "adapter"), out=str(tmp_path / "q"), dtype="float32", device="cpu",
                         max_questions=3, gen_prompts=1, gen_tokens=4, isolate=False, register_as="")
    first = quantize_step(cfg, progress=False)
    merged_at = (tmp_path / "q" / "merged" / "config.json").stat().st_mtime
    second = quantize_step(cfg, progress=False)
    assert (tmp_path / "q" / "merged" / "config.json").stat().st_mtime == merged_at  # reused, not merged again
    assert second["summary"]["original_latency_mean_s"] == first["summary"]["original_latency_mean_s"]


def test_calibration_texts_from_synth_qa_or_a_kb(tmp_path):
    import pandas as pd

    from fsku.steps.quantize import calibration_texts
    from fsku.synth.records import SyntheticQA, write_jsonl

    synth = tmp_path / "synth"
    synth.mkdir()
    write_jsonl([SyntheticQA("q1", "multiple_choice", "lookup", "보고 기한은?", "2", {"1": "즉시", "2": "7일"}),
                 SyntheticQA("q2", "descriptive", "lookup", "정의를 쓰시오.", "전자금융거래란 ...")], synth / "train.jsonl")
    texts = calibration_texts(str(synth), 5)
    assert len(texts) == 2 and texts[0].startswith("보고 기한은?") and "2 7일" in texts[0] and texts[0].endswith("\n2")
    kb = tmp_path / "kb"
    kb.mkdir()
    pd.DataFrame({"text": ["제1조 목적", " ", "제2조 정의", "제3조"]}).to_parquet(kb / "chunks.parquet")
    assert calibration_texts(str(kb), 2) == ["제1조 목적", "제2조 정의"]
    with pytest.raises(FileNotFoundError, match="synth_qa folder"):
        calibration_texts(str(tmp_path), 2)
