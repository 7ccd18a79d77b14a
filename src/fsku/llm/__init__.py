"""One small interface over LLM runtimes, chosen by name (``transformers``, ``vllm``, ``llamacpp``,
``auto``).

A backend renders chats with the tokenizer's own template, counts tokens, scores the next-token
log-probabilities of option labels (multiple choice: the answer is always a valid option) and
generates text. Heavy runtimes import lazily; a missing one gives an error naming the extra.

The interface itself lives in `fsku.llm.base` (re-exported here), so the backends import it without
importing this package's registry; model names are resolved by `fsku.llm.resolve` (registry URIs
are resolved before, by `fsku.tracking`).
"""
from __future__ import annotations

import importlib.util
from typing import Callable

from .base import DeadlineExceeded, Generation, LLMBackend, OptionRequest, check_deadline

__all__ = ["BACKENDS", "DeadlineExceeded", "Generation", "LLMBackend", "OptionRequest", "check_deadline", "load_llm"]


# each backend resolves the model name itself: transformers and vLLM load folders (a GGUF is converted
# once), llama.cpp loads the GGUF file as it is. `threads` and `token_batch` are llama.cpp settings,
# `gpu_memory_utilization` vLLM's.

def _transformers(model: str, threads: int = 0, token_batch: int = 512, **kw) -> LLMBackend:
    from .hf import TransformersBackend
    from .resolve import resolve_model

    kw.pop("gpu_memory_utilization", None)  # vLLM's
    return TransformersBackend(resolve_model(model), threads=threads, **kw)


def _vllm(model: str, threads: int = 0, token_batch: int = 512, **kw) -> LLMBackend:
    if importlib.util.find_spec("vllm") is None:
        raise ImportError("backend 'vllm' needs the vllm package (a GPU extra): pip install 'vllm==0.32.0' "
                          "(pins torch 2.13.0, transformers < 5.20), or use backend 'transformers'")
    from .resolve import resolve_model
    from .vllm_backend import VLLMBackend

    return VLLMBackend(resolve_model(model), **kw)


def _llamacpp(model: str, **kw) -> LLMBackend:
    from .llamacpp import INSTALL_HINT, LlamaCppBackend
    from .resolve import resolve_gguf

    kw.pop("gpu_memory_utilization", None)  # vLLM's
    if importlib.util.find_spec("llama_cpp") is None:
        raise ImportError(INSTALL_HINT)
    return LlamaCppBackend(resolve_gguf(model), **kw)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _auto(model: str, **kw) -> LLMBackend:
    """vLLM on CUDA when installed; on a CPU a GGUF model goes to llama.cpp when installed; else transformers."""
    from .resolve import is_gguf_model

    if importlib.util.find_spec("vllm") is not None and _cuda():
        return _vllm(model, **kw)
    if is_gguf_model(model) and importlib.util.find_spec("llama_cpp") is not None and not _cuda():
        return _llamacpp(model, **kw)
    return _transformers(model, **kw)


BACKENDS: dict[str, Callable[..., LLMBackend]] = {"auto": _auto, "transformers": _transformers, "vllm": _vllm,
                                                  "llamacpp": _llamacpp}


def load_llm(model: str, backend: str = "auto", **kw) -> LLMBackend:
    """Load `model` (hub id, folder, .gguf file or ``offline:<name>``) with the named backend."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown LLM backend {backend!r}; expected one of {sorted(BACKENDS)}")
    return BACKENDS[backend](model, **kw)
