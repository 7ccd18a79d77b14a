"""quantize: method registry, quantize -> save -> reload -> generate on a tiny model, and the
before/after math (hand-computed values)."""
import json
import math

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
    with pytest.raises(ValueError):
        Q.perplexity([[], []])


def test_latency_summary_and_ratios():
    s = Q.latency_summary(list(range(1, 21)))
    assert s["latency_mean_s"] == pytest.approx(10.5) and s["latency_p95_s"] == pytest.approx(19.05)
    assert Q.ratios({"a": 2.0, "b": 0.0, "c": 1.0}, {"a": 1.0, "b": 3.0}, ["a", "b", "c"]) == {"a_ratio": 0.5}
    with pytest.raises(ValueError):
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


def test_bad_source_and_device_are_clear(tmp_path, wide_tiny):
    pytest.importorskip("torchao")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        Q.quantize_model(tmp_path, "int8", tmp_path / "q")
    with pytest.raises(ValueError, match="runs on"):
        Q.quantize_model(wide_tiny, "int8", tmp_path / "q", device="mps")
