"""The llama.cpp backend: its sampling maths by hand, its KV-cache logic against a numpy engine that
enforces llama.cpp's rules (a token needs every earlier position of its sequence in the cache, the
cache has n_ctx cells, a decode at most n_batch tokens), and a real round trip when llama-cpp-python
and a GGUF are present."""
from __future__ import annotations

import hashlib
import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import pytest

from fsku.llm import DeadlineExceeded, OptionRequest
from fsku.llm import llamacpp as lc

EOS = 1
V = 130  # 0 unused, 1 end of generation, 2.. the 128 ASCII characters


class FakeEngine:
    """A deterministic 'model' whose next-token logits depend on the whole token history of a
    sequence, with llama.cpp's KV-cache semantics (cells shared by sequences, seq_rm / seq_cp)."""

    def __init__(self, n_ctx=512, n_batch=64, n_seq_max=9, metadata=None, eos_bias=-1.0, partial_rm=True):
        self.n_ctx, self.n_batch, self.n_seq_max, self.n_vocab = n_ctx, n_batch, n_seq_max, V
        self.partial_rm = partial_rm  # False: a recurrent model's memory, which only drops whole sequences
        self.metadata = metadata or {}
        self.cells: list[dict] = []  # {"pos", "token", "seqs"}
        self.decoded = 0  # tokens evaluated, to count the work the backend saved
        self.eos_bias = eos_bias

    def logits_for(self, history) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(np.asarray(history, dtype=np.int64).tobytes()).digest()[:8], "little")
        x = np.random.default_rng(seed).normal(0, 2.0, V).astype(np.float32)
        x[0] = -30.0
        x[EOS] += self.eos_bias
        return x

    def tokenize(self, text):
        return [2 + ord(c) if ord(c) < 128 else 2 + ord("?") for c in text]

    def detokenize(self, ids):
        return "".join(chr(t - 2) for t in ids if t >= 2)

    def is_eog(self, t):
        return t == EOS

    def special_tokens(self):
        return "<s>", "</s>"

    def _seq_tokens(self, seq):
        cells = sorted((c for c in self.cells if seq in c["seqs"]), key=lambda c: c["pos"])
        return [c["pos"] for c in cells], [c["token"] for c in cells]

    def decode(self, entries):
        assert 0 < len(entries) <= self.n_batch, f"a decode of {len(entries)} tokens (n_batch {self.n_batch})"
        rows = []
        for e in entries:
            assert 0 <= e.seq < self.n_seq_max
            positions, tokens = self._seq_tokens(e.seq)
            assert positions == list(range(e.pos)), f"seq {e.seq}: token at {e.pos} but the cache holds {positions}"
            self.cells.append({"pos": e.pos, "token": e.token, "seqs": {e.seq}})
            if len(self.cells) > self.n_ctx:
                raise RuntimeError("llama_decode returned 1 (no KV slot)")
            self.decoded += 1
            if e.logits:
                rows.append(self.logits_for(tokens + [e.token]))
        return np.array(rows, dtype=np.float32).reshape(len(rows), V)

    def seq_rm(self, seq, p0, p1=-1):
        p1 = math.inf if p1 < 0 else p1
        if not self.partial_rm and (p0 > 0 or p1 != math.inf) and any(seq in c["seqs"] and c["pos"] < p0
                                                                      for c in self.cells):
            return False
        for c in self.cells:
            if p0 <= c["pos"] < p1:
                c["seqs"].discard(seq)
        self.cells = [c for c in self.cells if c["seqs"]]
        return True

    def seq_cp(self, src, dst, p0, p1):
        for c in self.cells:
            if src in c["seqs"] and p0 <= c["pos"] < p1:
                c["seqs"].add(dst)


def backend(engine=None, batch_size=4, max_model_len=512):
    return lc.LlamaCppBackend("fake.gguf", max_model_len=max_model_len, batch_size=batch_size,
                              engine=engine or FakeEngine(n_ctx=max_model_len))


# -- pure functions

def test_log_softmax_by_hand_and_for_huge_logits():
    lp = lc.log_softmax(np.array([0.0, math.log(3.0)]))
    assert np.allclose(np.exp(lp), [0.25, 0.75])
    assert np.allclose(np.exp(lc.log_softmax(np.array([1e4, 1e4]))), [0.5, 0.5])  # no overflow


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    out = lc.apply_repetition_penalty(np.array([2.0, -2.0, 1.0]), np.array([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    same = np.array([2.0, -2.0])
    assert lc.apply_repetition_penalty(same, np.array([0]), 1.0) is same


def test_top_p_keeps_the_smallest_set_reaching_p():
    lp = np.log(np.array([0.2, 0.5, 0.3]))
    kept = np.isfinite(lc.top_p_mask(lp, 0.7))
    assert kept.tolist() == [False, True, True]  # 0.5 + 0.3 reaches 0.7
    assert np.isfinite(lc.top_p_mask(lp, 0.5)).tolist() == [False, True, False]  # the best alone reaches 0.5
    assert np.isfinite(lc.top_p_mask(lp, 0.01)).sum() == 1  # the best token is always kept
    assert lc.top_p_mask(lp, 1.0) is lp


def test_top_p_over_a_large_vocabulary_looks_past_the_first_candidates(monkeypatch):
    monkeypatch.setattr(lc, "TOP_P_CANDIDATES", 4)
    lp = np.log(np.full(100, 0.01))  # flat: 90 tokens are needed for 0.9
    assert np.isfinite(lc.top_p_mask(lp, 0.9)).sum() == 90


def test_sample_token_greedy_and_sampled_logprobs():
    logits = np.array([0.0, 2.0, 1.0])
    tok, lp = lc.sample_token(logits, None, temperature=0.0)
    assert tok == 1 and math.isclose(lp, float(lc.log_softmax(logits)[1]))
    # a penalty on the best token can hand the win to the next one
    tok, _ = lc.sample_token(logits, None, 0.0, seen=np.array([1]), repetition_penalty=4.0)
    assert tok == 2
    rng = np.random.default_rng(0)
    draws = [lc.sample_token(logits, rng, temperature=1.0, top_p=0.5)[0] for _ in range(20)]
    assert set(draws) == {1}  # top-p 0.5 leaves only the best token (p = 0.665)
    tok, lp = lc.sample_token(logits, np.random.default_rng(1), temperature=1.0)
    assert math.isclose(lp, float(lc.log_softmax(logits)[tok]))


def test_common_prefix():
    assert lc.common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert lc.common_prefix([], [1]) == 0
    assert lc.common_prefix([1, 2], [1, 2]) == 2


def test_render_template_as_transformers_renders_it():
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}{{ messages[0] | tojson }}")
    out = lc.render_template(template, [{"role": "user", "content": "금융"}], True, bos_token="<s>")
    assert out == '<s><|user|>금융\n<|assistant|>{"role": "user", "content": "금융"}'
    with pytest.raises(ValueError, match="chat template: no system"):
        lc.render_template("{{ raise_exception('no system') }}", [])
    # transformers' environment: trim_blocks + lstrip_blocks, tools none, tojson's keyword arguments
    tpl = "{% if tools is not none %}TOOLS{% endif %}\n  {% for m in messages %}\n{{ m | tojson(sort_keys=True) }}\n{% endfor %}"
    assert lc.render_template(tpl, [{"role": "user", "content": "x"}]) == '{"content": "x", "role": "user"}\n'



# -- the backend's KV-cache logic against the fake engine

def ref_logprobs(engine: FakeEngine, tokens) -> np.ndarray:
    return lc.log_softmax(engine.logits_for(list(tokens)))


def test_option_scoring_equals_scoring_each_prompt_alone_and_reads_the_prefix_once():
    eng = FakeEngine()
    llm = backend(eng)
    req = OptionRequest("system: choose.\nQ: which?\n", ["1 A\n2 B\nAnswer:", "1 B\n2 A\nAnswer:", "1 x\n2 y\n:"],
                        ["1", "2"])
    got = llm.option_logprobs(req)
    labels = llm.label_token_ids(["1", "2"])
    for i, s in enumerate(req.suffixes):
        want = ref_logprobs(eng, eng.tokenize(req.prefix + s))[labels]
        assert np.allclose(got[i], want, atol=1e-5)
    prefix, suffixes = eng.tokenize(req.prefix), [eng.tokenize(s) for s in req.suffixes]
    assert eng.decoded == len(prefix) + sum(map(len, suffixes))
    assert {s for c in eng.cells for s in c["seqs"]} == {0}  # the option sequences are cleared
    eng.decoded = 0
    again = llm.option_logprobs(req)  # the same prefix: only the suffixes are evaluated
    assert np.allclose(again, got) and eng.decoded == sum(map(len, suffixes))


def test_option_scoring_in_groups_when_the_cache_or_the_batch_is_small():
    eng = FakeEngine(n_ctx=60, n_batch=8)
    llm = backend(eng, batch_size=8, max_model_len=60)
    req = OptionRequest("prefix of the question ", [f"order {i} options" for i in range(5)], ["1", "2", "3"])
    got = llm.option_logprobs(req)  # 23 prefix tokens + 5 x 15 do not fit 60 cells at once
    labels = llm.label_token_ids(req.labels)
    for i, s in enumerate(req.suffixes):
        assert np.allclose(got[i], ref_logprobs(eng, eng.tokenize(req.prefix + s))[labels], atol=1e-5)


def test_option_scoring_limits_and_deadline():
    llm = backend(max_model_len=40)
    with pytest.raises(ValueError, match="exceeds max_model_len 40"):
        llm.option_logprobs(OptionRequest("x" * 30, ["y" * 20], ["1", "2"]))
    with pytest.raises(ValueError, match="non-empty suffixes"):
        llm.option_logprobs(OptionRequest("x", [""], ["1", "2"]))
    with pytest.raises(DeadlineExceeded):
        llm.option_logprobs(OptionRequest("x", ["y"], ["1", "2"]), deadline=time.monotonic() - 1)


def test_a_deadline_between_prompt_chunks_keeps_what_was_read(monkeypatch):
    eng = FakeEngine(n_batch=8)
    llm = backend(eng)
    req = OptionRequest("a long shared prefix of the question, read in chunks of eight ", ["1 A\n2 B:", "1 B\n2 A:"],
                        ["1", "2"])
    calls = []

    def deadline_after_two(deadline):
        calls.append(1)
        if len(calls) == 4:  # one check before the prompt, one per chunk
            raise DeadlineExceeded("per-question time limit exceeded")

    monkeypatch.setattr(lc, "check_deadline", deadline_after_two)
    with pytest.raises(DeadlineExceeded):
        llm.option_logprobs(req)
    assert eng.decoded == 16 and len(llm._cached) == 16  # two chunks read, and known
    monkeypatch.setattr(lc, "check_deadline", lambda deadline: None)
    eng.decoded = 0
    got = llm.option_logprobs(req)
    prefix = eng.tokenize(req.prefix)
    assert eng.decoded == len(prefix) - 16 + sum(len(eng.tokenize(x)) for x in req.suffixes)
    labels = llm.label_token_ids(req.labels)
    for i, x in enumerate(req.suffixes):
        assert np.allclose(got[i], ref_logprobs(eng, eng.tokenize(req.prefix + x))[labels], atol=1e-5)


def test_a_memory_that_only_drops_whole_sequences_starts_over():
    eng = FakeEngine(partial_rm=False)
    llm = backend(eng)
    first = llm.option_logprobs(OptionRequest("shared start, then A ", ["1 x\n2 y:"], ["1", "2"]))
    second = llm.option_logprobs(OptionRequest("shared start, then B ", ["1 x\n2 y:"], ["1", "2"]))
    labels = llm.label_token_ids(["1", "2"])
    assert np.allclose(first[0], ref_logprobs(eng, eng.tokenize("shared start, then A 1 x\n2 y:"))[labels], atol=1e-5)
    assert np.allclose(second[0], ref_logprobs(eng, eng.tokenize("shared start, then B 1 x\n2 y:"))[labels], atol=1e-5)


def test_continuation_logprobs_are_the_teacher_forced_token_logprobs():
    eng = FakeEngine()
    llm = backend(eng)
    prompts, conts = ["question one? ", "question one? ", "other"], ["yes it is", "no", "z"]
    got = llm.continuation_logprobs(prompts, conts)
    for p, c, lp in zip(prompts, conts, got, strict=True):
        pt, ct = eng.tokenize(p), eng.tokenize(c)
        want = [ref_logprobs(eng, pt + ct[:j])[ct[j]] for j in range(len(ct))]
        assert np.allclose(lp, want, atol=1e-5)
    with pytest.raises(ValueError, match="must both encode"):
        llm.continuation_logprobs(["p"], [""])


def replay(eng, prompt_tokens, text, temperature, top_p):
    """The log-probabilities of a generated text under the reference model (the distribution
    sample_token draws from), to check which history each token was sampled from."""
    toks = eng.tokenize(text)
    out = []
    for j, t in enumerate(toks):
        lp = lc.log_softmax(eng.logits_for(prompt_tokens + toks[:j]))
        if temperature > 0:
            lp = lc.log_softmax(lc.top_p_mask(lc.log_softmax(eng.logits_for(prompt_tokens + toks[:j]) / temperature),
                                              top_p))
        out.append(lp[t])
    return toks, out


def test_greedy_generation_follows_the_reference_and_copies_identical_prompts():
    eng = FakeEngine(eos_bias=-50.0)  # never ends by itself: stops at max_new_tokens
    llm = backend(eng)
    gens = llm.generate(["hello ", "hello ", "other "], max_new_tokens=6)
    assert gens[0] == gens[1] and gens[0].n_tokens == 6 and gens[0].truncated
    p = eng.tokenize("hello ")
    toks = list(p)
    for _ in range(6):
        toks.append(int(np.argmax(eng.logits_for(toks))))
    assert eng.tokenize(gens[0].text) == toks[len(p):]
    _, lps = replay(eng, p, gens[0].text, 0.0, 1.0)
    assert math.isclose(gens[0].mean_logprob, float(np.mean(lps)), abs_tol=1e-5)


def test_k_samples_of_one_prompt_are_decoded_together_from_one_prompt_pass():
    eng = FakeEngine(eos_bias=2.0)  # ends now and then
    llm = backend(eng, batch_size=4)
    prompt = "Explain the rule. "
    gens = llm.generate([prompt] * 6, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    assert len(gens) == 6 and len({g.text for g in gens}) > 1
    p = eng.tokenize(prompt)
    for g in gens:
        toks, lps = replay(eng, p, g.text, 0.8, 0.9)
        assert g.n_tokens == len(toks)
        if toks:
            assert math.isclose(g.mean_logprob, float(np.mean(lps)), abs_tol=1e-5)
        assert g.truncated == (g.n_tokens == 12)
    # the prompt was evaluated once; each sample's tokens once, but the last (never fed back)
    assert eng.decoded == len(p) + sum(max(0, g.n_tokens - (1 if g.truncated else 0)) for g in gens)
    again = llm.generate([prompt] * 6, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    assert [g.text for g in again] == [g.text for g in gens]  # the seed decides


def test_consecutive_prompts_share_their_common_prefix_and_leave_only_sequence_0():
    eng = FakeEngine(eos_bias=-50.0)
    llm = backend(eng)
    system = "You answer statute questions briefly. "
    llm.generate([system + "first?"], max_new_tokens=3)
    eng.decoded = 0
    llm.generate([system + "second?"], max_new_tokens=3, temperature=0.5, seed=1)
    # the common prefix (system + "") stays; "second?" is read, then 2 of the 3 new tokens are fed back
    assert eng.decoded == len(eng.tokenize("second?")) + 2
    assert {s for c in eng.cells for s in c["seqs"]} == {0}


def test_repetition_penalty_in_generation_follows_the_reference():
    eng = FakeEngine(eos_bias=-50.0)
    llm = backend(eng)
    gen = llm.generate(["abcabc "], max_new_tokens=8, repetition_penalty=1.8)[0]
    toks = eng.tokenize("abcabc ")
    start = len(toks)
    for _ in range(8):
        x = lc.apply_repetition_penalty(eng.logits_for(toks), np.unique(np.asarray(toks)), 1.8)
        toks.append(int(np.argmax(x)))
    assert eng.tokenize(gen.text) == toks[start:]
    plain = llm.generate(["abcabc "], max_new_tokens=8)[0]
    assert plain.text != gen.text  # the penalty changed the path (checked for this seed-free fake)


def test_generation_limits():
    llm = backend(max_model_len=40)
    with pytest.raises(ValueError, match="exceeds max_model_len 40"):
        llm.generate(["x" * 30], max_new_tokens=20)
    eng = FakeEngine(eos_bias=-50.0)
    gens = backend(eng).generate(["abc"], max_new_tokens=50, max_time=0.0)
    assert gens[0].n_tokens == 1 and gens[0].truncated  # max_time bounds the call


def test_chat_rendering_uses_the_gguf_template_else_the_plain_layout():
    tpl = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[a]{% endif %}"
    llm = backend(FakeEngine(metadata={"tokenizer.chat_template": tpl}))
    assert llm.render_chat([{"role": "user", "content": "q"}]) == "[user]q[a]"
    plain = backend().render_chat([{"role": "user", "content": "q"}])
    assert plain == "### user\nq\n### assistant\n"


def test_labels_count_and_truncate_use_the_engine_tokenizer():
    llm = backend()
    assert llm.label_token_ids(["1", "2"]) == [2 + ord("1"), 2 + ord("2")]
    assert llm.count_tokens("abcd") == 4 and llm.truncate_tokens("abcdef", 3) == "abc"


# -- the registry

def test_llamacpp_without_the_extra_names_it(monkeypatch, tmp_path):
    from fsku import llm as llm_pkg

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ImportError, match=r"llamacpp extra: pip install 'llama-cpp-python==0\.3\.36'"):
        llm_pkg.load_llm(str(gguf), backend="llamacpp")


def test_auto_picks_llamacpp_for_a_gguf_on_cpu_when_installed(monkeypatch):
    from fsku import llm as llm_pkg

    picked = []
    monkeypatch.setattr(llm_pkg, "_llamacpp", lambda model, **kw: picked.append(("llamacpp", model)))
    monkeypatch.setattr(llm_pkg, "_transformers", lambda model, **kw: picked.append(("transformers", model)))
    monkeypatch.setattr(llm_pkg, "_cuda", lambda: False)
    real = importlib.util.find_spec
    installed = {"llama_cpp": True, "vllm": False}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed[name] else None) if name in installed else real(name, *a))
    llm_pkg.load_llm("offline:qwen2.5-coder-0.5b-instruct")
    llm_pkg.load_llm("models/some-folder")
    installed["llama_cpp"] = False
    llm_pkg.load_llm("x.gguf")
    assert picked == [("llamacpp", "offline:qwen2.5-coder-0.5b-instruct"), ("transformers", "models/some-folder"),
                      ("transformers", "x.gguf")]


def test_resolve_gguf_says_what_it_loads(tmp_path):
    from fsku.llm.resolve import ModelNotFound, is_gguf_model, resolve_gguf

    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(ValueError, match="loads GGUF files"):
        resolve_gguf(str(folder))
    with pytest.raises(ModelNotFound, match="GGUF file not found"):
        resolve_gguf(str(tmp_path / "missing.gguf"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_gguf(str(f)) == str(f)
    assert is_gguf_model("offline:x") and is_gguf_model("a/b/c.gguf") and not is_gguf_model("Qwen/Qwen2.5-0.5B")


def test_the_config_declares_the_llamacpp_settings():
    from fsku.config import InferConfig

    cfg = InferConfig(backend="llamacpp", threads=2, token_batch=256)
    kw = cfg.llm_kwargs(max_model_len=1024)
    assert kw["backend"] == "llamacpp" and kw["threads"] == 2 and kw["token_batch"] == 256 and kw["max_model_len"] == 1024
    with pytest.raises(ValueError, match="threads must be >= 0"):
        InferConfig(threads=-1)
    with pytest.raises(ValueError, match="backend must be one of"):
        InferConfig(backend="onnx")


# -- a real round trip (the extra and an assembled GGUF)

def _real_gguf() -> Path | None:
    from fsku.home import models_dir

    for name in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"):
        path = models_dir() / "gguf" / f"{name}.gguf"
        if path.is_file():
            return path
    return None


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python (the llamacpp extra) "
                    "is not installed: pip install 'fsku[llamacpp]' or make llm-models")
def test_real_llamacpp_round_trip():
    gguf = _real_gguf()
    if gguf is None:
        pytest.skip("no assembled GGUF under the models dir (make llm-models)")
    from fsku.llm import load_llm

    llm = load_llm(str(gguf), backend="llamacpp", max_model_len=1024, batch_size=4, threads=2)
    question = "전자금융거래법의 목적은? 정답 번호만 답하시오.\n1 거래 안전\n2 요리\n3 운동"
    chat = llm.render_chat([{"role": "user", "content": question}])
    assert chat.startswith("<|im_start|>") and chat.endswith("<|im_start|>assistant\n")
    head, _, tail = chat.rpartition("1 거래")
    req = OptionRequest(head, ["1 거래" + tail, "1 거래" + tail.replace("2 요리", "2 운동")], ["1", "2", "3"])
    scores = llm.option_logprobs(req)
    assert scores.shape == (2, 3) and np.all(scores < 0) and np.all(np.isfinite(scores))
    # the shared-prefix batch agrees with teacher forcing of each whole prompt alone
    alone = llm.continuation_logprobs([req.prefix + s for s in req.suffixes], ["1", "1"])
    assert np.allclose(scores[:, 0], [a[0] for a in alone], atol=0.05)
    gens = llm.generate([chat, chat], max_new_tokens=8, temperature=0.7, seed=0)
    assert len(gens) == 2 and all(0 < g.n_tokens <= 8 for g in gens)
    greedy = llm.generate([chat], max_new_tokens=8)[0]
    assert greedy.text.strip() and greedy.mean_logprob <= 0


def test_the_extra_pins_the_version_the_hint_names():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["optional-dependencies"]["llamacpp"] == [lc.LLAMACPP_PIN]


def test_cmake_args_take_the_cpu_extensions_but_never_amx(tmp_path):
    flags = {"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512cd", "avx512vl", "avx512dq", "amx_int8", "amx_tile"}
    args = lc.cmake_args(flags)
    assert args[0] == "-DGGML_NATIVE=OFF" and "-DGGML_AVX2=ON" in args and "-DGGML_FMA=ON" in args
    assert "-DGGML_AVX512=OFF" in args  # avx512bw missing: all five are needed
    assert "-DGGML_AMX_INT8=OFF" in args and not any("AMX" in a and a.endswith("=ON") for a in args)
    assert lc.cmake_args(None) == ["-DGGML_NATIVE=ON"]
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert lc.read_cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "fma"}
    assert lc.read_cpu_flags(str(tmp_path / "none")) is None
