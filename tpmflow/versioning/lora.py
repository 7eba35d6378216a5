"""Low-rank updates stored as their factors: a PEFT LoRA folder applied to the parent's weights.

Only the factors are stored (r·(in+out) numbers instead of in·out). The dense weight is rebuilt as
``W' = W + scale · (B @ A)`` in float64, then cast to W's dtype. The product is accumulated as rank-1
outer products in rank order, each an IEEE-rounded numpy multiply and add, never BLAS (whose
summation order, threading and FMA use differ between machines): every machine produces the same
bits, which the version id (a hash of the rebuilt weights) depends on.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tpmflow.errors import InvalidRequest
from tpmflow.versioning.tensorfile import FLOATS, from_float64, read_layout, to_float64

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
BLOCK_ELEMENTS = 1 << 22  # rows are rebuilt in blocks so a large matrix never needs 3 float64 copies
_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.default)?(\.weight)?$")


@dataclass(frozen=True)
class Factor:
    """One factor matrix as stored in the adapter file (its own dtype, untouched)."""

    raw: np.ndarray  # uint8
    dtype: str
    shape: tuple[int, int]

    def values(self) -> np.ndarray:
        return to_float64(self.raw, self.dtype).reshape(self.shape)


@dataclass(frozen=True)
class LoraUpdate:
    """The update of one base weight: ``W += scale * (B @ A)``, transposed for embeddings and
    ``fan_in_fan_out`` (GPT-2 Conv1D) layers, where W is stored as (in, out)."""

    target: str
    a: Factor
    b: Factor
    scale: float
    transpose: bool

    def params(self) -> dict[str, Any]:
        return {
            "a": {"dtype": self.a.dtype, "shape": list(self.a.shape)},
            "b": {"dtype": self.b.dtype, "shape": list(self.b.shape)},
            "scale": self.scale,
            "transpose": self.transpose,
        }


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name's dotted suffix."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def read_peft(folder: Path) -> tuple[list[LoraUpdate], dict[str, Any]]:
    """Read a PEFT LoRA folder; returns one update per target weight (sorted) and a config summary.

    Features that are not a pure low-rank update (DoRA, saved full modules, biases) are refused
    rather than silently dropped.
    """
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"{folder} is not a PEFT LoRA folder ({ADAPTER_CONFIG}): {exc}") from exc
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise InvalidRequest(f"{folder} has no {ADAPTER_WEIGHTS}")
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise InvalidRequest("only plain LoRA adapters can be committed as factors (no DoRA or other PEFT types)")
    if config.get("modules_to_save") or config.get("bias", "none") != "none":
        raise InvalidRequest("adapters with modules_to_save or trained biases are not a low-rank update")
    layout = read_layout(folder / ADAPTER_WEIGHTS)
    data = layout.data()
    found: dict[str, dict[str, Factor]] = {}
    embeddings: set[str] = set()
    for span in layout.tensors:
        m = _KEY.match(span.name)
        if not m or len(span.shape) != 2 or span.dtype not in FLOATS:
            raise InvalidRequest(f"unexpected tensor {span.name} ({span.dtype}, {span.shape}) in the adapter")
        module = m["module"].removeprefix(PREFIX)
        kind = m["kind"].removeprefix("lora_").removeprefix("embedding_")
        found.setdefault(module, {})[kind] = Factor(
            np.array(data[span.begin : span.end]), span.dtype, (span.shape[0], span.shape[1])
        )
        if m["kind"].startswith("lora_embedding"):
            embeddings.add(module)
    updates = []
    for module, parts in sorted(found.items()):
        if "A" not in parts or "B" not in parts:
            raise InvalidRequest(f"adapter module {module} lacks lora_A or lora_B")
        a, b = parts["A"], parts["B"]
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise InvalidRequest(f"adapter module {module}: lora_A {a.shape} and lora_B {b.shape} disagree on rank")
        alpha = float(_pattern(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        transpose = module in embeddings or bool(config.get("fan_in_fan_out"))
        updates.append(LoraUpdate(module + ".weight", a, b, scale, transpose))
    summary = {k: config.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules", "base_model_name_or_path")}
    return updates, summary


def apply_lora(
    base: np.ndarray, dtype: str, shape: tuple[int, ...], a: np.ndarray, b: np.ndarray, scale: float, transpose: bool
) -> np.ndarray:
    """The rebuilt weight's bytes: ``W + scale · (B @ A)`` (or its transpose), float64, then cast.

    ``a`` (r, in) and ``b`` (out, r) are float64. Row blocks do not change any element's arithmetic,
    only the memory needed.
    """
    left, right = (a.T, b.T) if transpose else (b, a)  # W[i, j] += scale * sum_k left[i, k] * right[k, j]
    if dtype not in FLOATS or len(shape) != 2 or (left.shape[0], right.shape[1]) != tuple(shape):
        raise InvalidRequest(
            f"a LoRA update of shape {(left.shape[0], right.shape[1])} does not fit a {dtype} {shape} weight"
        )
    weight = to_float64(base, dtype).reshape(shape)
    out = np.empty(base.size, np.uint8).reshape(shape[0], -1)
    rows = max(1, BLOCK_ELEMENTS // max(1, shape[1]))
    for start in range(0, shape[0], rows):
        block = slice(start, start + rows)
        delta = np.zeros((min(rows, shape[0] - start), shape[1]))
        for k in range(left.shape[1]):
            delta += np.multiply.outer(left[block, k], right[k, :])
        out[block] = from_float64(weight[block] + scale * delta, dtype).reshape(delta.shape[0], -1)
    return out.reshape(-1)


@dataclass(frozen=True)
class StoredFactors:
    """One module's factors as the store keeps them, ready to be written back as a PEFT adapter."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    a: Factor
    b: Factor
    scale: float


def write_peft(factors: list[StoredFactors], dest: Path, base_model: str) -> Path:
    """Write ``factors`` as a PEFT LoRA folder that vLLM loads (``--lora-modules name=dest``).

    The factor bytes are written untouched, so the served update is the committed one. vLLM scales
    every module by one ``lora_alpha / r``: adapters whose modules differ in rank or scale (PEFT's
    rank_pattern / alpha_pattern) are refused here, and such a version is served merged instead.
    """
    import torch
    from safetensors.torch import save_file

    if not factors:
        raise InvalidRequest("the version has no LoRA factors to serve")
    ranks = {f.a.shape[0] for f in factors}
    scales = {f.scale for f in factors}
    if len(ranks) != 1 or len(scales) != 1:
        raise InvalidRequest(
            f"its modules differ in rank {sorted(ranks)} or scale {sorted(scales)}; vLLM applies one of each"
        )
    rank, scale = ranks.pop(), scales.pop()
    torch_dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    tensors = {}
    for f in factors:
        for kind, factor in (("lora_A", f.a), ("lora_B", f.b)):
            values = torch.frombuffer(bytearray(factor.raw.tobytes()), dtype=torch_dtype[factor.dtype])
            tensors[f"{PREFIX}{f.module}.{kind}.weight"] = values.reshape(factor.shape)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": scale * rank,  # vLLM's scaling is lora_alpha / r
        "use_rslora": False,
        "target_modules": sorted({f.module.rsplit(".", 1)[-1] for f in factors}),
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": base_model,
    }
    (dest / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return dest
