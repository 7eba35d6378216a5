"""Decode throughput of one replica from memory bandwidth: a decode step is bound by the bytes it
streams, not by its arithmetic (a token does ~2 flops per weight byte it reads).

Each step streams, on every rank, its share of the weights (for an MoE, only the experts the
step's tokens route to: with many tokens that is all of them) plus the KV cache of its sequences.
Tensor-parallel ranks stream in parallel. Pipeline stages each hold a micro-batch, so a replica
with P stages keeps P micro-batches in flight: a token still waits for every stage.

The peak is scaled by an efficiency: measured on this machine's CPU by ``bench/plan_calibration.py``
(``calibration.json`` beside this module), else a documented default.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tpmflow.planning.hardware import Accelerator
from tpmflow.planning.model import ModelSpec
from tpmflow.planning.shape import stage_layers

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
# Defaults while nothing is measured. GPUs: vLLM's decode typically reaches 50-70% of HBM peak on
# large models (kernel launch gaps, attention over paged KV, collectives between TP ranks); 0.6 is
# the middle. CPU: an uncalibrated guess until bench/plan_calibration.py has run here.
DEFAULT_EFFICIENCY = {"gpu": 0.6, "cpu": 0.5}


class Efficiency(BaseModel):
    value: float
    source: str


class Decode(BaseModel):
    """One replica decoding ``batch`` sequences at ``context`` tokens each."""

    batch: int
    context: int
    step_ms: float  # between two tokens of one sequence
    tokens_per_s: float  # all the replica's sequences together
    gib_per_step: float  # what the fullest rank streams for one micro-batch
    efficiency: float


def load_calibration(path: Path | None = None) -> dict[str, Any]:
    """Measured figures per device kind (``{"cpu": {...}}``); empty when nothing was measured."""
    try:
        data = json.loads((path or CALIBRATION_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def efficiency_for(acc: Accelerator, override: float | None = None) -> Efficiency:
    """The fraction of peak bandwidth decode reaches on ``acc``, and where the figure comes from."""
    if override is not None:
        return Efficiency(value=override, source="given")
    measured = load_calibration().get(acc.kind) or {}
    if measured.get("efficiency"):
        where = f"measured {measured.get('date', '?')} ({measured.get('model', 'local model')})"
        return Efficiency(value=float(measured["efficiency"]), source=where)
    default = DEFAULT_EFFICIENCY[acc.kind]
    why = "documented default" if acc.kind == "gpu" else "default, uncalibrated (run bench/plan_calibration.py)"
    return Efficiency(value=default, source=why)


def decode(
    model: ModelSpec,
    acc: Accelerator,
    tp: int,
    pp: int,
    *,
    batch: int,
    context: int,
    efficiency: float,
    kv_dtype: str | None = None,
) -> Decode:
    """Bandwidth-bound decode of ``batch`` sequences, each reading ``context`` tokens of KV cache."""
    batch = max(1, batch)
    micro = math.ceil(batch / min(pp, batch))  # sequences per micro-batch
    touched = model.expected_experts(micro) if model.is_moe else None
    kv_layer = model.kv_bytes_per_token_layer(tp, kv_dtype) * context * micro
    stages = stage_layers(model.layers, pp)
    streamed = 0.0
    for s, layers in enumerate(stages):
        nbytes = sum(model.layer_bytes(i, tp, experts_touched=touched) for i in layers) + kv_layer * len(layers)
        if s == len(stages) - 1:
            nbytes += model.head_bytes(tp, pipeline=True)  # the unembedding is read whole each step
        streamed = max(streamed, nbytes)
    stage_s = streamed / (acc.bandwidth_gb_s * 1e9 * efficiency)
    step_s = pp * stage_s
    return Decode(
        batch=batch,
        context=context,
        step_ms=step_s * 1e3,
        tokens_per_s=batch / step_s,
        gib_per_step=streamed / 2**30,
        efficiency=efficiency,
    )
