"""One small interface over LLM runtimes, chosen by name (``transformers``, ``vllm``, ``auto``).

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


def _transformers(model: str, **kw) -> LLMBackend:
    from .hf import TransformersBackend

    return TransformersBackend(model, **kw)


def _vllm(model: str, **kw) -> LLMBackend:
    if importlib.util.find_spec("vllm") is None:
        raise ImportError("backend 'vllm' needs the vllm package (a GPU extra): pip install 'vllm==0.32.0' "
                          "(pins torch 2.13.0, transformers < 5.20), or use backend 'transformers'")
    from .vllm_backend import VLLMBackend

    return VLLMBackend(model, **kw)


def _auto(model: str, **kw) -> LLMBackend:
    if importlib.util.find_spec("vllm") is not None:
        import torch

        if torch.cuda.is_available():
            return _vllm(model, **kw)
    return _transformers(model, **kw)


BACKENDS: dict[str, Callable[..., LLMBackend]] = {"auto": _auto, "transformers": _transformers, "vllm": _vllm}


def load_llm(model: str, backend: str = "auto", **kw) -> LLMBackend:
    """Load `model` (hub id, folder, .gguf file or ``offline:<name>``) with the named backend."""
    from .resolve import resolve_model

    if backend not in BACKENDS:
        raise ValueError(f"unknown LLM backend {backend!r}; expected one of {sorted(BACKENDS)}")
    return BACKENDS[backend](resolve_model(model), **kw)
