"""Resource projections for the target machine (pure arithmetic; every result carries its lines).

Memory: weights (parameters × bytes per parameter of the precision) + KV cache (2 × layers × KV heads ×
head dim × bytes per value × max_model_len × sequences in flight) + a fixed overhead (CUDA context,
activations, logits), against the GPU's memory. Time: for each question type, questions × (tokens read
/ prefill tokens/s + decode steps / decode tokens/s), the speeds from a documented throughput row
(fsku/package/contenders.yaml) of the same engine and precision, scaled from the row's parameter count
to the model's; plus the load time. Both are estimates to refuse the impossible early, not a promise.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .facts import Architecture, ThroughputRow

GIB = 2 ** 30
# bytes per parameter; 4-bit counts its group scales (≈ 4.5 bits: group size 64-128 with 16-bit scales and zeros)
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "4bit": 0.5625}
SCALE_LIMITS = (0.25, 8.0)  # a row stands for models within these parameter ratios (small models are overhead-bound)
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                     "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class MemoryProjection:
    weights_gib: float
    kv_gib: Optional[float]
    overhead_gib: float
    total_gib: float
    limit_gib: float
    lines: list

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.limit_gib

    @property
    def complete(self) -> bool:
        return self.kv_gib is not None

    def to_dict(self) -> dict:
        return {**self.__dict__, "fits": self.fits, "complete": self.complete}


def memory_projection(parameters: float, precision: str, architecture: Optional[Architecture], max_model_len: int,
                      sequences: int, overhead_gib: float, limit_gib: float, kv_bytes_per_value: float = 2.0,
                      gpu: str = "the GPU", stored_bytes: Optional[float] = None) -> MemoryProjection:
    """Weights + KV cache + overhead against `limit_gib`; without an architecture the KV cache is
    unknown (the projection says so and counts it as 0). `stored_bytes` (a quantized folder's tensors
    as stored) replaces parameters x bytes per parameter."""
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"precision must be one of {sorted(BYTES_PER_PARAM)}, got {precision!r}")
    if parameters <= 0 or max_model_len < 1 or sequences < 1 or overhead_gib < 0 or limit_gib <= 0:
        raise ValueError("parameters, max_model_len, sequences and limit_gib must be positive, overhead_gib >= 0")
    per = BYTES_PER_PARAM[precision]
    if stored_bytes is not None:
        weights = stored_bytes / GIB
        lines = [f"weights: the {precision} tensors as stored ({stored_bytes:,.0f} bytes) = {weights:.2f} GiB"]
    else:
        weights = parameters * per / GIB
        lines = [f"weights: {parameters / 1e9:.3f}e9 parameters x {per:g} bytes ({precision}) = {weights:.2f} GiB"]
    kv = None
    if architecture is not None:
        kv = architecture.kv_bytes_per_token(kv_bytes_per_value) * max_model_len * sequences / GIB
        lines.append(f"KV cache: 2 x {architecture.layers} layers x {architecture.kv_heads} KV heads x "
                     f"{architecture.head_dim} dims x {kv_bytes_per_value:g} bytes x {max_model_len:,} tokens x "
                     f"{sequences} sequences = {kv:.2f} GiB")
    else:
        lines.append("KV cache: unknown (no layers / KV heads / head_dim for this model: give `architecture` in a "
                     "contenders file, or package the model folder, whose config.json has them); counted as 0")
    total = weights + (kv or 0.0) + overhead_gib
    lines.append(f"overhead (CUDA context, activations, logits): {overhead_gib:.2f} GiB")
    verdict = "fits" if total <= limit_gib else f"over by {total - limit_gib:.2f} GiB"
    lines.append(f"total {total:.2f} GiB vs {limit_gib:g} GiB on {gpu}: {verdict}")
    return MemoryProjection(round(weights, 3), None if kv is None else round(kv, 3), overhead_gib, round(total, 3),
                            limit_gib, lines)


def pick_throughput(rows: Sequence[ThroughputRow], engine: str, precision: str,
                    parameters_b: float) -> tuple[Optional[ThroughputRow], float]:
    """The row of `engine` and `precision` nearest in parameters (log scale) and the speed factor
    row parameters / model parameters, limited to SCALE_LIMITS; (None, 1) when no row matches."""
    same = [r for r in rows if r.engine == engine and r.precision == precision]
    if not same or parameters_b <= 0:
        return None, 1.0
    row = min(same, key=lambda r: (abs(math.log(r.parameters_b / parameters_b)), r.parameters_b))
    factor = min(max(row.parameters_b / parameters_b, SCALE_LIMITS[0]), SCALE_LIMITS[1])
    return row, factor


@dataclass
class TimeProjection:
    seconds: float
    budget_s: float
    lines: list

    @property
    def fits(self) -> bool:
        return self.seconds <= self.budget_s

    def to_dict(self) -> dict:
        return {**self.__dict__, "fits": self.fits, "minutes": round(self.seconds / 60, 2)}


def time_projection(profile: dict, counts: dict, row: ThroughputRow, factor: float, load_s: float,
                    budget_s: float, gpu: str = "the GPU") -> TimeProjection:
    """`profile`: question type -> {"read": tokens read per question, "decoded": sequential decode steps
    per question} (measured); `counts`: question type -> questions in the test set."""
    prefill, decode = row.prefill_tps * factor, row.decode_tps * factor
    kinds = row.kind if not row.prefill_kind or row.prefill_kind == row.kind else \
        f"decode {row.kind}, prefill {row.prefill_kind}"
    lines = [f"speeds on {gpu}: {row.engine} {row.precision} row of {row.parameters_b:g}B ({kinds}, source "
             f"{row.source}: {row.prefill_tps:,.0f} read / {row.decode_tps:,.1f} generated tokens/s) x {factor:.3g} "
             f"(parameter ratio) = {prefill:,.0f} / {decode:,.1f} tokens/s"]
    total = load_s
    for kind, n in counts.items():
        if not n:
            continue
        if kind not in profile:  # priced like the most expensive measured type, said so
            if not profile:
                raise ValueError("no measured tokens for any question type: nothing to project from")
            stand_in = max(profile, key=lambda k: float(profile[k]["read"]) / prefill + float(profile[k]["decoded"]) / decode)
            lines.append(f"{kind}: none in the measured sample; priced as {stand_in}")
            read, decoded = float(profile[stand_in]["read"]), float(profile[stand_in]["decoded"])
        else:
            read, decoded = float(profile[kind]["read"]), float(profile[kind]["decoded"])
        seconds = n * (read / prefill + decoded / decode)
        total += seconds
        lines.append(f"{kind}: {n} x ({read:,.0f} read / {prefill:,.0f} + {decoded:,.1f} decoded / {decode:,.1f}) "
                     f"= {seconds:,.0f} s")
    lines.append(f"load {load_s:,.0f} s; total {total / 60:,.1f} min vs budget {budget_s / 60:g} min: "
                 + ("fits" if total <= budget_s else f"over by {(total - budget_s) / 60:,.1f} min"))
    return TimeProjection(round(total, 1), budget_s, lines)


# ----------------------------------------------------------------------------- a model folder's own numbers

def folder_architecture(folder: Path) -> Optional[Architecture]:
    """layers / KV heads / head dim from a transformers config.json (None when they are not all there)."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
    layers = cfg.get("num_hidden_layers", cfg.get("num_layers", cfg.get("n_layer")))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if cfg.get("hidden_size") and heads else None)
    if not (layers and kv_heads and head_dim):
        return None
    return Architecture(int(layers), int(kv_heads), int(head_dim), cfg.get("max_position_embeddings"))


def folder_tensors(folder: Path) -> Optional[tuple[int, int]]:
    """(elements, bytes) stored in the folder's safetensors files, from their headers (no tensor is
    read); None without readable safetensors. Packed quantized weights count their stored elements."""
    total, nbytes, seen = 0, 0, False
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with path.open("rb") as fh:
                size = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(size))
        except (OSError, ValueError, struct.error):
            return None
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            seen = True
            n = math.prod(tensor.get("shape") or [1])
            total += n
            nbytes += n * SAFETENSORS_BYTES.get(str(tensor.get("dtype")), 4)
    return (total, nbytes) if seen else None
