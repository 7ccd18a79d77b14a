"""llama.cpp backend (the ``llamacpp`` extra: llama-cpp-python): GGUF models run as they are stored
(Q4_K_M etc.), several times faster than their dequantised transformers copy on a CPU.

The backend drives llama.cpp's batch API directly, so it can share work between sequences:

- sequence 0 of the KV cache holds the last prompt evaluated; a new prompt re-evaluates only what
  follows the common token prefix (the system prompt and context of consecutive calls);
- option scoring evaluates the shared prefix once, copies it into one sequence per option order
  (a unified KV cache shares the cells instead of copying them) and evaluates every suffix in the
  same batch, reading the label log-probabilities at each suffix's last token;
- identical prompts in one `generate` call (k samples for voting) are decoded together, one
  sequence each, from one evaluation of the prompt;
- continuation log-probabilities (cloze scoring, the synth_qa judge) come from the logits of every
  continuation token, evaluated in one pass after the prompt.

Generation stops at any of the vocabulary's end-of-generation tokens (llama.cpp's list: for Qwen2.5
also ``<|fim_pad|>``, ``<|repo_name|>`` and ``<|file_sep|>`` besides ``<|im_end|>`` and ``<|endoftext|>``).

All that logic talks to an `engine` with six calls (tokenize, detokenize, decode a batch, remove
and copy sequence ranges, end-of-generation test); `LlamaCppEngine` implements it with llama.cpp,
the tests with a numpy model. Sampling (temperature, top-p, repetition penalty, seed) is done here
in numpy on the logits, as transformers does it, so both backends read the same settings alike.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .base import Generation, LLMBackend, OptionRequest, check_deadline

log = logging.getLogger(__name__)

LLAMACPP_PIN = "llama-cpp-python==0.3.36"
INSTALL_HINT = (f"backend 'llamacpp' needs the llamacpp extra: pip install '{LLAMACPP_PIN}' (compiles llama.cpp, "
                "~7 min on 2 cores; `make llm-models` does it), or use backend 'transformers'")
TOP_P_CANDIDATES = 2048  # top-p looks at the best tokens first; the full vocabulary only if they fall short

# x86 CPU flags (/proc/cpuinfo) -> the ggml CMake options that use them. AMX is never switched on: its
# kernels crash (SIGSEGV in ggml_backend_amx_mul_mat, seen here) on virtual CPUs that advertise AMX, and
# -march=native (GGML_NATIVE) would turn it on wherever the flag is present.
GGML_X86_OPTIONS = (
    ("GGML_SSE42", ("sse4_2",)), ("GGML_F16C", ("f16c",)), ("GGML_FMA", ("fma",)), ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX", ("avx",)), ("GGML_AVX2", ("avx2",)), ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)), ("GGML_AVX512_VNNI", ("avx512_vnni",)), ("GGML_AVX512_BF16", ("avx512_bf16",)),
)


def cmake_args(cpu_flags: Optional[set[str]]) -> list[str]:
    """CMAKE_ARGS for building llama-cpp-python on this CPU: every ISA extension it has except AMX
    (`GGML_X86_OPTIONS`); None (no /proc/cpuinfo, not x86): llama.cpp's own -march=native."""
    if cpu_flags is None:
        return ["-DGGML_NATIVE=ON"]
    args = ["-DGGML_NATIVE=OFF"]
    for option, needs in GGML_X86_OPTIONS:
        args.append(f"-D{option}={'ON' if all(f in cpu_flags for f in needs) else 'OFF'}")
    return args + ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def read_cpu_flags(path: str = "/proc/cpuinfo") -> Optional[set[str]]:
    """The x86 feature flags of the first CPU in `path`; None when there are none (other systems)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


# -- pure functions (numpy), tested against hand-computed values

def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def apply_repetition_penalty(logits: np.ndarray, seen: Optional[np.ndarray], penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: the logits of tokens in `seen` (the prompt and
    the tokens generated so far) are divided by `penalty` when positive, multiplied when negative."""
    if penalty == 1.0 or seen is None or not len(seen):
        return logits
    out = np.array(logits, dtype=np.float64)
    values = out[seen]
    out[seen] = np.where(values > 0, values / penalty, values * penalty)
    return out


def top_p_mask(logprobs: np.ndarray, top_p: float) -> np.ndarray:
    """Log-probabilities with every token outside the smallest set whose probability reaches `top_p`
    set to -inf (the best token is always kept; ties at the boundary go by token id)."""
    if top_p >= 1.0:
        return logprobs
    n = len(logprobs)
    k = min(n, TOP_P_CANDIDATES)
    while True:
        best = np.argpartition(-logprobs, k - 1)[:k] if k < n else np.arange(n)
        best = best[np.lexsort((best, -logprobs[best]))]  # by log-probability, then token id
        cum = np.cumsum(np.exp(logprobs[best]))
        if cum[-1] >= top_p or k == n:
            keep = best[:int(np.searchsorted(cum, top_p) + 1)]
            break
        k = min(n, 4 * k)
    out = np.full_like(logprobs, -np.inf)
    out[keep] = logprobs[keep]
    return out


def sample_token(logits: np.ndarray, rng: Optional[np.random.Generator], temperature: float = 0.0,
                 top_p: float = 1.0, seen: Optional[np.ndarray] = None,
                 repetition_penalty: float = 1.0) -> tuple[int, float]:
    """(token, its log-probability) from one row of next-token logits: the repetition penalty, then
    greedy (temperature 0) or sampling at `temperature` within `top_p`. The log-probability is taken
    from the distribution the token was drawn from (as transformers' scores with normalize_logits)."""
    x = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature <= 0:
        lp = log_softmax(x)
        token = int(np.argmax(x))
        return token, float(lp[token])
    lp = top_p_mask(log_softmax(np.asarray(x) / temperature), top_p)
    lp = log_softmax(lp)  # renormalised over the kept tokens
    p = np.exp(lp)
    token = int((rng or np.random.default_rng()).choice(len(p), p=p / p.sum()))
    return token, float(lp[token])


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    import json
    from datetime import datetime

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def render_template(template: str, messages: Sequence[dict], add_generation_prompt: bool = True,
                    bos_token: str = "", eos_token: str = "") -> str:
    """A chat template (Jinja, as stored in a GGUF's ``tokenizer.chat_template``) rendered the way
    transformers renders it: sandboxed, trim_blocks/lstrip_blocks, ``raise_exception`` and
    ``strftime_now`` available, ``tojson`` keeping non-ASCII text, ``tools``/``documents`` none.
    (transformers' ``{% generation %}`` tag, used only for training masks, is not supported.)"""
    return _compiled_template(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                               bos_token=bos_token, eos_token=eos_token, tools=None, documents=None)


# -- the engine: what the backend needs from llama.cpp

@dataclass
class Entry:
    """One token of a decode batch: `token` at position `pos` of sequence `seq`; `logits`: read its
    next-token logits after the decode."""

    token: int
    pos: int
    seq: int
    logits: bool = False


_BACKEND_READY = False  # llama_backend_init once per process


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python's low-level wrappers (the pinned version): one model, one
    context with a unified KV cache of `n_ctx` cells shared by up to `n_seq_max` sequences."""

    def __init__(self, path: str, n_ctx: int, n_batch: int, n_seq_max: int, n_threads: int, n_gpu_layers: int = 0):
        try:
            import llama_cpp
            from llama_cpp import _internals, _logger
        except ImportError as e:
            raise ImportError(INSTALL_HINT) from e
        self._llama = llama_cpp
        _logger.set_verbose(log.isEnabledFor(logging.DEBUG))  # llama.cpp's load chatter only with FSKU_DEBUG
        global _BACKEND_READY
        if not _BACKEND_READY:
            llama_cpp.llama_backend_init()
            _BACKEND_READY = True
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self.model = _internals.LlamaModel(path_model=path, params=mparams, verbose=False)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, n_batch
        cparams.n_seq_max = min(n_seq_max, llama_cpp.llama_max_parallel_sequences())
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.kv_unified = True  # copied prefixes share their cells
        self.ctx = _internals.LlamaContext(model=self.model, params=cparams, verbose=False)
        # what llama.cpp made of the request: n_ctx padded, n_batch clamped to it (a larger decode aborts the process)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx.ctx)
        self.n_batch = min(n_batch, llama_cpp.llama_n_batch(self.ctx.ctx))
        self.n_seq_max = int(llama_cpp.llama_n_seq_max(self.ctx.ctx))
        self.n_vocab = self.model.n_vocab()
        self._batch = _internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self.metadata = self.model.metadata()

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        import ctypes

        llama_cpp = self._llama
        out = b""
        size = 256
        buf = (ctypes.c_char * size)()
        for t in ids:
            n = llama_cpp.llama_token_to_piece(self.model.vocab, llama_cpp.llama_token(t), buf, size, 0, False)
            if n < 0:  # a piece longer than the buffer: -n bytes needed
                size = -n
                buf = (ctypes.c_char * size)()
                n = llama_cpp.llama_token_to_piece(self.model.vocab, llama_cpp.llama_token(t), buf, size, 0, False)
            out += bytes(buf[:n])
        return out.decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._llama.llama_vocab_is_eog(self.model.vocab, token))

    def token_text(self, token: int) -> str:
        return self.model.token_get_text(token) if token >= 0 else ""

    def special_tokens(self) -> tuple[str, str]:
        """(BOS text, EOS text) for chat templates."""
        return self.token_text(self.model.token_bos()), self.token_text(self.model.token_eos())

    def decode(self, entries: Sequence[Entry]) -> np.ndarray:
        """Evaluate `entries` (at most n_batch) in one llama_decode; the logits rows of the entries
        marked `logits`, in order (shape (marked, n_vocab), float32)."""
        b = self._batch.batch
        b.n_tokens = len(entries)
        marked = []
        for i, e in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = e.token, e.pos, 1, e.logits
            b.seq_id[i][0] = e.seq
            if e.logits:
                marked.append(i)
        self.ctx.decode(self._batch)
        rows = np.empty((len(marked), self.n_vocab), dtype=np.float32)
        for r, i in enumerate(marked):
            rows[r] = np.ctypeslib.as_array(self.ctx.get_logits_ith(i), shape=(self.n_vocab,))
        return rows

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        """Remove positions [p0, p1) of `seq` (p1 < 0: to the end); False when the memory cannot drop a
        part of a sequence (recurrent models)."""
        return bool(self._llama.llama_memory_seq_rm(self.ctx.memory, seq, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self._llama.llama_memory_seq_cp(self.ctx.memory, src, dst, p0, p1)


def default_threads() -> int:
    """Threads for llama.cpp when the config says 0: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class LlamaCppBackend(LLMBackend):
    """The `LLMBackend` interface over a llama.cpp engine (see the module docstring)."""

    name = "llamacpp"

    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", max_model_len: int = 4096,
                 batch_size: int = 8, threads: int = 0, token_batch: int = 512, engine=None):
        super().__init__(model, "gguf", device, max_model_len)
        self.batch_size = batch_size  # sequences decoded together (k samples, option orders)
        if engine is None:
            n_gpu = -1 if device.startswith("cuda") else 0  # a CUDA build offloads every layer
            threads = threads or default_threads()
            engine = LlamaCppEngine(model, n_ctx=max_model_len, n_batch=token_batch, n_seq_max=batch_size + 1,
                                    n_threads=threads, n_gpu_layers=n_gpu)
            log.info("loaded %s with llama.cpp (%d threads, %d KV cells, %d sequences)", model, threads,
                     engine.n_ctx, engine.n_seq_max)
        self.engine = engine
        self.parallel = max(1, min(batch_size, engine.n_seq_max - 1))  # sequence 0 keeps the prompt
        self._cached: list[int] = []  # the tokens sequence 0 holds
        meta = getattr(engine, "metadata", {}) or {}
        self.chat_template = meta.get("tokenizer.chat_template")

    # -- text
    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template:
            bos, eos = self.engine.special_tokens()
            return render_template(self.chat_template, messages, add_generation_prompt, bos, eos)
        return super().render_chat(messages, add_generation_prompt)  # the plain layout

    def encode(self, text: str) -> list[int]:
        return self.engine.tokenize(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.engine.detokenize([t for t in ids if not self.engine.is_eog(t)])

    def fingerprint(self) -> str:
        from ..stores import digest

        path = Path(self.model_id)
        ident = [path.name, path.stat().st_size, int(path.stat().st_mtime)] if path.is_file() else [self.model_id]
        return f"{self.name}:{self.model_id}:{digest(ident, 12)}"

    # -- the KV cache
    def _decode_all(self, entries: list[Entry], deadline: Optional[float] = None) -> np.ndarray:
        """Decode `entries` in chunks of the engine's batch; the marked logits rows in order."""
        rows = []
        step = self.engine.n_batch
        for start in range(0, len(entries), step):
            check_deadline(deadline)
            rows.append(self.engine.decode(entries[start:start + step]))
        return np.concatenate(rows) if rows else np.empty((0, self.engine.n_vocab), dtype=np.float32)

    def _clear_seqs(self, seqs) -> None:
        for s in seqs:
            self.engine.seq_rm(s, 0, -1)

    def _prompt(self, tokens: list[int], need_logits: bool, deadline: Optional[float] = None) -> Optional[np.ndarray]:
        """Make sequence 0 hold exactly `tokens`, evaluating only what follows the common prefix with
        what it held; the next-token logits after the last token when `need_logits`."""
        keep = common_prefix(self._cached, tokens)
        if need_logits and keep == len(tokens):
            keep -= 1  # the last token is evaluated again to read its logits
        if not self.engine.seq_rm(0, keep, -1):  # the memory keeps whole sequences only: start over
            self.engine.seq_rm(0, 0, -1)
            keep = 0
        self._cached = self._cached[:keep]
        todo = [Entry(t, keep + i, 0) for i, t in enumerate(tokens[keep:])]
        if todo and need_logits:
            todo[-1].logits = True
        last = None
        for start in range(0, len(todo), self.engine.n_batch):
            check_deadline(deadline)
            chunk = todo[start:start + self.engine.n_batch]
            rows = self.engine.decode(chunk)
            self._cached = list(tokens[:chunk[-1].pos + 1])  # a deadline between chunks keeps what was read
            if len(rows):
                last = rows[-1]
        return last if need_logits else None

    def _check_fits(self, n: int, what: str) -> None:
        if n > self.max_model_len:
            raise ValueError(f"{what} of {n} tokens exceeds max_model_len {self.max_model_len}")

    def _groups(self, sizes: Sequence[int], prompt_len: int) -> list[list[int]]:
        """Consecutive groups of sequence indices that run together: at most `parallel`, and their new
        cells (`sizes`) within the KV cells the prompt leaves free."""
        free = self.engine.n_ctx - prompt_len
        groups: list[list[int]] = []
        used = 0
        for i, n in enumerate(sizes):
            if n > free:
                raise ValueError(f"a prompt of {prompt_len} tokens + {n} more exceeds the {self.engine.n_ctx} KV cells")
            if not groups or len(groups[-1]) >= self.parallel or used + n > free:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += n
        return groups

    # -- model calls
    def option_logprobs(self, request: OptionRequest, deadline: Optional[float] = None) -> np.ndarray:
        label_ids = self.label_token_ids(request.labels)
        prefix = self.encode(request.prefix)
        suffixes = [self.encode(s) for s in request.suffixes]
        if not suffixes or any(not s for s in suffixes):
            raise ValueError("option scoring needs non-empty suffixes")
        self._check_fits(len(prefix) + max(len(s) for s in suffixes), "prompt")
        check_deadline(deadline)
        self._prompt(prefix, need_logits=False, deadline=deadline)
        out = np.empty((len(suffixes), len(label_ids)), dtype=np.float64)
        for group in self._groups([len(s) for s in suffixes], len(prefix)):
            entries = []
            for slot, i in enumerate(group, start=1):
                if prefix:
                    self.engine.seq_cp(0, slot, 0, len(prefix))
                entries += [Entry(t, len(prefix) + j, slot) for j, t in enumerate(suffixes[i])]
                entries[-1].logits = True
            try:
                rows = self._decode_all(entries, deadline)
            finally:
                self._clear_seqs(range(1, len(group) + 1))
            out[group] = log_softmax(rows)[:, label_ids]
        return out

    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[np.ndarray]:
        pairs = [(self.encode(p), self.encode(c)) for p, c in zip(prompts, continuations, strict=True)]
        out: list[np.ndarray] = []
        for i, (p, c) in enumerate(pairs):
            if not p or not c:
                raise ValueError(f"continuation {i}: prompt and continuation must both encode to tokens")
            self._check_fits(len(p) + len(c), f"continuation {i}: prompt + continuation")
            first = self._prompt(p, need_logits=True)
            # every continuation token but the last predicts the next one
            entries = [Entry(t, len(p) + j, 0, logits=j < len(c) - 1) for j, t in enumerate(c)]
            rows = self._decode_all(entries)
            self._cached = p + c
            lp = log_softmax(np.vstack([first[None, :], rows]))
            out.append(lp[np.arange(len(c)), c])
        return out

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, seed: Optional[int] = None, max_time: Optional[float] = None,
                 repetition_penalty: float = 1.0) -> list[Generation]:
        """Identical prompts are decoded together, one sequence each, after one evaluation of the
        prompt (greedy: once, copied); different prompts one after the other, each reusing the common
        prefix with the previous one. `max_time` bounds the whole call, as in transformers."""
        rng = np.random.default_rng(seed)
        stop_at = time.monotonic() + max_time if max_time is not None else None
        results: list[Optional[Generation]] = [None] * len(prompts)
        order: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            order.setdefault(p, []).append(i)
        for prompt, where in order.items():
            tokens = self.encode(prompt)
            if not tokens:
                raise ValueError("generate needs a prompt that encodes to tokens")
            self._check_fits(len(tokens) + max_new_tokens, f"prompt of {len(tokens)} tokens + {max_new_tokens} new:")
            logits = self._prompt(tokens, need_logits=True)
            n = 1 if temperature <= 0 else len(where)
            gens: list[Generation] = []
            for group in self._groups([max_new_tokens] * n, len(tokens)):
                gens += self._sample_group(tokens, logits, len(group), max_new_tokens, temperature, top_p, rng,
                                           stop_at, repetition_penalty)
            for k, i in enumerate(where):
                results[i] = gens[k if n > 1 else 0]
        return results  # type: ignore[return-value]

    def _sample_group(self, tokens: list[int], logits: np.ndarray, k: int, max_new: int, temperature: float,
                      top_p: float, rng, stop_at: Optional[float], repetition_penalty: float) -> list[Generation]:
        """k continuations of the prompt in sequence 0, decoded together in sequences 1..k."""
        start = len(tokens)
        prompt_ids = np.unique(np.asarray(tokens, dtype=np.int64)) if repetition_penalty != 1.0 else None
        new: list[list[int]] = [[] for _ in range(k)]
        lps: list[list[float]] = [[] for _ in range(k)]
        done = [False] * k
        rows = np.repeat(logits[None, :], k, axis=0)
        for slot in range(1, k + 1):
            self.engine.seq_cp(0, slot, 0, start)
        try:
            for step in range(max_new):
                entries, live = [], []
                for s in range(k):
                    if done[s]:
                        continue
                    seen = None
                    if prompt_ids is not None:
                        seen = np.union1d(prompt_ids, np.asarray(new[s], dtype=np.int64))
                    tok, lp = sample_token(rows[s], rng, temperature, top_p, seen, repetition_penalty)
                    if self.engine.is_eog(tok):
                        done[s] = True
                        continue
                    new[s].append(tok)
                    lps[s].append(lp)
                    if step + 1 < max_new:
                        entries.append(Entry(tok, start + step, s + 1, logits=True))
                        live.append(s)
                if not entries or (stop_at is not None and time.monotonic() > stop_at):
                    break
                got = self._decode_all(entries)
                for r, s in enumerate(live):
                    rows[s] = got[r]
        finally:
            self._clear_seqs(range(1, k + 1))
        return [Generation(self.engine.detokenize(new[s]), len(new[s]), float(np.mean(lps[s])) if lps[s] else 0.0,
                           not done[s]) for s in range(k)]


if __name__ == "__main__":  # `python -m fsku.llm.llamacpp`: the CMAKE_ARGS `make llm-models` builds llama.cpp with
    print(" ".join(cmake_args(read_cpu_flags())))
