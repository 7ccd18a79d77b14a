"""Named-choice tables that every layer may read: loss types, quantization methods, multiple-choice
prompt styles. Plain data (no torch, no runtime imports), so that validating a config on the ground
floor needs none of the stages that implement the choices.

The implementing modules import their table from here and key their functions by the same names:
``fsku.distill.losses`` (LOSS_TYPES), ``fsku.quantize`` (QUANT_METHODS, checked at import that every
method has an implementation and nothing else), ``fsku.infer.prompts`` (MC_STYLES).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# ----------------------------------------------------------------------------- distillation losses

@dataclass(frozen=True)
class LossSpec:
    """Which divergence applies to teacher responses (chosen) and to student responses (rejected)."""
    chosen: Optional[str]
    rejected: Optional[str]
    needs_teacher: bool
    help: str


LOSS_TYPES: dict[str, LossSpec] = {
    "distillm_v2": LossSpec("skew_forward_kl", "skew_reverse_kl", True,
                            "(2-beta)*SKL on teacher responses + beta*SRKL on student responses"),
    "sft": LossSpec("cross_entropy", None, False, "cross-entropy on teacher responses"),
    "kd": LossSpec("forward_kl", None, True, "forward KL(p||q) on teacher responses"),
    "rkl": LossSpec(None, "reverse_kl", True, "reverse KL(q||p) on student responses (on-policy)"),
    "gkd": LossSpec("generalized_jsd", "generalized_jsd", True,
                    "(2-beta)*JSD on teacher responses + beta*JSD on student responses"),
}


# ----------------------------------------------------------------------------- quantization methods

@dataclass(frozen=True)
class QuantSpec:
    """What a quantization method is, without how it runs (fsku.quantize holds the functions)."""
    name: str
    bits: int
    packages: tuple[str, ...]  # import names that must be present
    install: str  # what to pip install when they are not (the pinned requirement)
    devices: tuple[str, ...]  # "cpu" and/or "cuda"
    needs_calibration: bool
    help: str


QUANT_METHODS: dict[str, QuantSpec] = {
    "int8": QuantSpec("int8", 8, ("torchao",), "torchao==0.18.0", ("cpu", "cuda"), False,
                      "torchao int8 weight-only (the CPU default)"),
    "bnb-8bit": QuantSpec("bnb-8bit", 8, ("bitsandbytes",), "bitsandbytes==0.50.2", ("cpu", "cuda"), False,
                          "bitsandbytes LLM.int8()"),
    "bnb-nf4": QuantSpec("bnb-nf4", 4, ("bitsandbytes",), "bitsandbytes==0.50.2", ("cpu", "cuda"), False,
                         "bitsandbytes 4-bit NF4, double quantization"),
    "gptq": QuantSpec("gptq", 4, ("gptqmodel",), "gptqmodel==7.6.0 (builds C extensions; set GPTQMODEL_CPU_WORKERS)",
                      ("cpu", "cuda"), True, "4-bit GPTQ (gptqmodel), calibrated on synth_qa prompts"),
}


# ----------------------------------------------------------------------------- multiple-choice prompts

@dataclass(frozen=True)
class MCStyle:
    """How a multiple-choice prompt is laid out: worked examples as earlier chat turns, and text the
    assistant turn starts with (the option label is scored right after it)."""

    examples: bool = False
    prefill: str = ""
    system: bool = True  # False: no system turn of ours (the chat template's own default, if any)


MC_STYLES: dict[str, MCStyle] = {
    "plain": MCStyle(),
    "prefill": MCStyle(prefill="정답: "),
    "fewshot": MCStyle(examples=True),
    "fewshot+prefill": MCStyle(examples=True, prefill="정답: "),
    "bare": MCStyle(system=False),
}
