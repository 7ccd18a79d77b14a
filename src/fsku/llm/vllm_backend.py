"""vLLM backend (GPU extra, imported lazily). Prefix caching shares the context and stem between
option orders automatically, so option scoring sends whole prompts.

Option scores are the first generated token's log-probabilities. vLLM returns the top-k of the raw
distribution (k = TOP_LOGPROBS); an option label outside the top-k gets the k-th value, an upper
bound of its true log-probability (after a multiple-choice prompt the digits are normally all in it).
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from .base import Generation, LLMBackend, OptionRequest, check_deadline

log = logging.getLogger(__name__)
TOP_LOGPROBS = 20


class VLLMBackend(LLMBackend):
    name = "vllm"

    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", max_model_len: int = 4096,
                 batch_size: int = 64, gpu_memory_utilization: float = 0.85, seed: int = 0):
        super().__init__(model, dtype, device, max_model_len)
        import vllm

        self._vllm = vllm
        self.engine = vllm.LLM(model=model, dtype=dtype, max_model_len=max_model_len, enable_prefix_caching=True,
                               gpu_memory_utilization=gpu_memory_utilization, seed=seed)
        self.tokenizer = self.engine.get_tokenizer()
        self.batch_size = batch_size

    def option_logprobs(self, request: OptionRequest, deadline: Optional[float] = None) -> np.ndarray:
        check_deadline(deadline)
        label_ids = self.label_token_ids(request.labels)
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=max(TOP_LOGPROBS, len(label_ids)))
        outs = self.engine.generate([request.prefix + s for s in request.suffixes], params, use_tqdm=False)
        return np.stack([first_token_label_logprobs(o.outputs[0].logprobs[0], label_ids) for o in outs])

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, seed: Optional[int] = None, max_time: Optional[float] = None,
                 repetition_penalty: float = 1.0) -> list[Generation]:
        # vLLM has no wall-clock stop; the orchestrator's deadline is checked between calls
        # vLLM seeds each request on its own: one seed for all would make k samples of a prompt identical
        params = [self._vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                            top_p=top_p if temperature > 0 else 1.0,
                                            seed=None if seed is None else seed + i, logprobs=0,
                                            repetition_penalty=repetition_penalty) for i in range(len(prompts))]
        outs = self.engine.generate(list(prompts), params, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            n = len(c.token_ids)
            mean = (c.cumulative_logprob / n) if n and c.cumulative_logprob is not None else 0.0
            results.append(Generation(c.text, n, float(mean), c.finish_reason == "length"))
        return results


def first_token_label_logprobs(top: dict, label_ids: Sequence[int]) -> np.ndarray:
    """Label log-probs from vLLM's {token_id: Logprob} top-k dict; absent labels get the k-th value."""
    values = {tid: float(lp.logprob) for tid, lp in top.items()}
    floor = min(values.values())
    return np.array([values.get(t, floor) for t in label_ids], dtype=np.float64)
