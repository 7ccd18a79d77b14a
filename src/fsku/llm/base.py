"""The LLM interface every backend implements (`LLMBackend`), its request/response types and the
per-question deadline. The backends (`hf`, `vllm_backend`) import this module, and the package
`fsku.llm` re-exports it with the backend registry, so no backend imports the package itself."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)


class DeadlineExceeded(TimeoutError):
    """A per-question time limit ran out between two model calls."""


def check_deadline(deadline: Optional[float]) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("per-question time limit exceeded")


def label_token_id(encode: Callable[[str], list[int]], decode: Callable[[Sequence[int]], str], label: str) -> int:
    """The token that starts `label` after the assistant header: its first token, or its last when the
    ones before it decode to whitespace (a SentencePiece '▁' piece before the digit). Shared by option
    scoring (a backend's own encode/decode) and by distillation's label targets, so both read one token."""
    ids = encode(label)
    if not ids:
        raise ValueError(f"label {label!r} encodes to no token")
    return ids[-1] if len(ids) > 1 and decode(ids[:-1]).strip() == "" else ids[0]


@dataclass
class OptionRequest:
    """Score `labels` as the next token after ``prefix + suffix`` for each suffix.

    The prefix (system prompt, context, stem) is shared by every suffix (the option lines in one
    order each), so backends can encode it once."""

    prefix: str
    suffixes: list[str]
    labels: list[str]


@dataclass
class Generation:
    text: str
    n_tokens: int
    mean_logprob: float  # mean log-probability of the generated tokens (a confidence signal)
    truncated: bool  # stopped by max_new_tokens / max_time rather than by an end-of-turn token


class LLMBackend:
    """Base class; subclasses implement `_load`, `option_logprobs` and `generate`."""

    name = "base"

    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", max_model_len: int = 4096):
        self.model_id, self.dtype, self.device, self.max_model_len = model, dtype, device, max_model_len
        self.tokenizer = None

    # -- text
    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        # models without a template (tiny test models, base models): a plain, explicit layout
        text = "".join(f"### {m['role']}\n{m['content']}\n" for m in messages)
        return text + ("### assistant\n" if add_generation_prompt else "")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as it stands in a prompt: no BOS/EOS added, special-token text
        (``<|im_start|>``) read as the special token."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens left out."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        ids = self.encode(text)
        if len(ids) <= max_tokens:
            return text
        return self.decode(ids[:max(0, max_tokens)])

    def label_token_ids(self, labels: Sequence[str]) -> list[int]:
        """The single token that starts each label right after the assistant header."""
        out = []
        for label in labels:
            try:
                out.append(label_token_id(self.encode, self.decode, label))
            except ValueError:
                raise ValueError(f"{self.model_id}: label {label!r} encodes to no token") from None
        if len(set(out)) != len(out):
            raise ValueError(f"{self.model_id}: option labels {list(labels)} share first tokens {out}; "
                             "option scoring needs distinct ones")
        return out

    def fingerprint(self) -> str:
        return f"{self.name}:{self.model_id}:{self.dtype}"

    # -- model calls
    def option_logprobs(self, request: OptionRequest, deadline: Optional[float] = None) -> np.ndarray:
        """(len(suffixes), len(labels)) next-token log-probabilities (full-vocabulary softmax)."""
        raise NotImplementedError

    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[np.ndarray]:
        """Per-token log-probabilities of each continuation's tokens after its prompt (teacher forcing;
        perplexity of reference answers)."""
        raise NotImplementedError(f"backend {self.name!r} does not score continuations; use backend 'transformers'")

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, seed: Optional[int] = None, max_time: Optional[float] = None,
                 repetition_penalty: float = 1.0) -> list[Generation]:
        raise NotImplementedError


def scores_continuations(llm) -> bool:
    """Whether the backend (or the backend a TokenMeter wraps) implements continuation_logprobs."""
    inner = llm.inner if isinstance(llm, TokenMeter) else llm
    return type(inner).continuation_logprobs is not LLMBackend.continuation_logprobs


class TokenMeter:
    """An LLM backend that counts what it reads and generates, for projecting a test set's time on other
    hardware (seconds per question do not carry over, tokens do). Every other attribute is the wrapped
    backend's.

    - tokens_read: prompt tokens, the shared prefix of option scoring once and identical prompts of one
      generate call (k samples) once: what a serving backend with a prefix cache (vLLM) prefills;
    - tokens_generated: every sample's tokens, re-asks included;
    - decode_steps: the longest sample of each batch of a generate call: the sequential decode steps;
    - calls: model calls.
    The prompt is counted before the call (a call that times out has read it); counting never fails a
    call: a backend that cannot count is logged once."""

    def __init__(self, inner: LLMBackend):
        self.inner = inner
        self._warned = False
        self.reset()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def reset(self) -> None:
        self.tokens_read = self.tokens_generated = self.decode_steps = self.calls = 0

    def snapshot(self) -> tuple[int, int, int]:
        return self.tokens_read, self.tokens_generated, self.decode_steps

    def _count(self, texts: Sequence[str]) -> int:
        try:
            return sum(self.inner.count_tokens(text) for text in texts)
        except Exception as exc:  # a stand-in backend without a tokenizer: no count, the answer still stands
            if not self._warned:
                log.warning("%s: tokens not counted (%s); the package time projection will lack them",
                            getattr(self.inner, "model_id", "model"), exc)
                self._warned = True
            return 0

    def option_logprobs(self, request: OptionRequest, deadline: Optional[float] = None) -> np.ndarray:
        self.tokens_read += self._count([request.prefix, *request.suffixes])
        self.calls += 1
        return self.inner.option_logprobs(request, deadline=deadline)

    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[np.ndarray]:
        self.tokens_read += self._count([*prompts, *continuations])
        self.calls += 1
        return self.inner.continuation_logprobs(prompts, continuations)

    def generate(self, prompts: Sequence[str], *args, **kwargs) -> list[Generation]:
        self.tokens_read += self._count(list(dict.fromkeys(prompts)))
        self.calls += 1
        out = self.inner.generate(prompts, *args, **kwargs)
        self.tokens_generated += sum(g.n_tokens for g in out)
        # sequences decode together within a batch; the batches of one call (batch_size) one after another
        # (vLLM schedules the whole call at once)
        size = len(out) if getattr(self.inner, "name", "") == "vllm" else max(1, int(getattr(self.inner, "batch_size", 0)
                                                                                      or len(out) or 1))
        self.decode_steps += sum(max(g.n_tokens for g in out[i:i + size]) for i in range(0, len(out), size))
        return out
