"""The plan as data (a pydantic model: ``--json`` is its dump) and as a table for people."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table

from tpmflow.planning.cost import HourlyCost
from tpmflow.planning.hardware import Accelerator
from tpmflow.planning.model import ModelSpec
from tpmflow.planning.probe import ProbeLoad
from tpmflow.planning.roofline import Decode, Efficiency
from tpmflow.planning.shape import GIB, EngineSettings, Fit


class ModelSummary(BaseModel):
    name: str
    architecture: str
    parameters: int
    active_parameters: int
    dtype: str
    compute_dtype: str
    weights_gib: float
    kv_bytes_per_token: float
    kv_gib_per_sequence: float  # unsplit, at the planned context

    @classmethod
    def of(cls, model: ModelSpec, context: int, kv_dtype: str | None = None) -> ModelSummary:
        parts = [f"{model.layers} layers", f"hidden {model.hidden}", f"{model.heads} heads"]
        parts.append("MLA" if model.is_mla else f"{model.kv_heads} KV heads")
        if model.is_moe:
            parts.append(f"MoE {model.experts} experts, {model.experts_per_token} per token")
        per_token = model.kv_bytes_per_token(kv_dtype)
        return cls(
            name=model.name,
            architecture=", ".join(parts),
            parameters=model.total_params(),
            active_parameters=model.active_params(),
            dtype=model.dtype,
            compute_dtype=model.compute_dtype,
            weights_gib=model.weight_bytes() / GIB,
            kv_bytes_per_token=per_token,
            kv_gib_per_sequence=per_token * context / GIB,
        )


class Plan(BaseModel):
    """Everything ``tpmflow plan`` found, in the units its field names say."""

    model: ModelSummary
    hardware: Accelerator
    workload: dict[str, Any]
    engine: EngineSettings
    smallest: Fit = Field(description="the smallest shape that holds the model and the required sequences")
    shape: Fit = Field(description="the shape chosen: the fewest nodes in all for the targets")
    replicas: int
    total_nodes: int
    batch_per_replica: int
    decode: Decode = Field(description="one replica at batch_per_replica")
    decode_one: Decode = Field(description="one replica decoding a single sequence: the fastest a sequence goes")
    efficiency: Efficiency
    pool_tokens_per_s: float
    probe: ProbeLoad | None = None
    cost: HourlyCost
    notes: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def _b(n: float) -> str:
    return f"{n / 1e9:,.1f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M"


def _shape(fit: Fit) -> str:
    return f"{fit.label}: {fit.devices} device(s) on {fit.nodes} node(s)"


def _gib(value: float) -> str:
    """A size in GiB, or in MiB / KiB when small."""
    if value >= 1:
        return f"{value:,.1f} GiB"
    return f"{value * 1024:,.0f} MiB" if value * 1024 >= 1 else f"{value * 2**20:,.0f} KiB"


def _memory(fit: Fit) -> str:
    return (
        f"{_gib(fit.weights_gib)} weights + {_gib(fit.activations_gib + fit.runtime_gib)} activations/runtime "
        f"+ {_gib(fit.kv_gib_per_sequence)} KV per sequence, of {_gib(fit.budget_gib)}"
    )


def render(plan: Plan, console: Console) -> None:
    """The plan as one table, then its notes and warnings."""
    m, hw, w = plan.model, plan.hardware, plan.workload
    table = Table(title=f"tpmflow plan: {m.name} on {hw.name}", show_header=False, show_lines=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("model", m.architecture)
    table.add_row(
        "parameters",
        f"{_b(m.parameters)}" + (f" ({_b(m.active_parameters)} active)" if m.active_parameters != m.parameters else ""),
    )
    table.add_row("weights", f"{_gib(m.weights_gib)} ({m.dtype}; compute {m.compute_dtype})")
    table.add_row(
        "KV cache",
        f"{m.kv_bytes_per_token / 1024:,.1f} KiB per token, {_gib(m.kv_gib_per_sequence)} per {w['context']}-token sequence",
    )
    table.add_row(
        "hardware", f"{hw.name}: {hw.memory_gib:g} GiB, {hw.bandwidth_gb_s:,.0f} GB/s, {hw.per_node} per node"
    )
    table.add_row("smallest shape", _shape(plan.smallest))
    table.add_row("  per device", _memory(plan.smallest))
    if plan.shape != plan.smallest:
        table.add_row("chosen shape", _shape(plan.shape))
        table.add_row("  per device", _memory(plan.shape))
    table.add_row(
        "sequences / replica",
        f"holds {plan.shape.max_sequences} sequences of {w['context']} tokens; runs {plan.batch_per_replica} at once",
    )
    table.add_row("replicas", f"{plan.replicas} ({plan.total_nodes} node(s) in all)")
    one = f"; batch 1: {plan.decode_one.tokens_per_s:,.1f} tok/s" if plan.decode.batch > 1 else ""
    table.add_row(
        "decode / replica",
        f"{plan.decode.tokens_per_s:,.1f} tok/s at batch {plan.decode.batch} ({plan.decode.step_ms:.3g} ms/token){one}",
    )
    target = f" (target {w['tokens_per_s']:,.0f})" if w.get("tokens_per_s") else ""
    table.add_row("pool output", f"{plan.pool_tokens_per_s:,.1f} tok/s{target}")
    table.add_row("roofline efficiency", f"{plan.efficiency.value:g} ({plan.efficiency.source})")
    if plan.probe is not None:
        table.add_row(
            "probe traffic",
            f"{plan.probe.bytes_per_request / 1e6:,.1f} MB per request, {plan.probe.store_mb_s:,.1f} MB/s into the store",
        )
    parts = ", ".join(f"{k} {v:,.1f}" for k, v in plan.cost.su_by_counter.items() if v)
    table.add_row(
        "SU per hour", f"{plan.cost.su_per_hour:,.1f} ({plan.cost.service_class}{': ' + parts if parts else ''})"
    )
    console.print(table)
    for note in plan.notes:
        console.print(f"[dim]note:[/] {note}")
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
