"""A capacity plan: the smallest replica shape that holds the model, the shape and replica count
that meet the targets on the fewest nodes, their decode throughput, the probe traffic's load on
the store, and the SUs an hour of it costs.

The smallest shape is not always the cheapest: one that barely holds the weights has little room
for KV cache, so it serves few sequences at once; a shape one step bigger may serve the same
targets with fewer nodes in all. The planner sizes every shape from the smallest up, and stops once
a replica alone would need as many nodes as the best pool found.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from tpmflow.access.costs import CostModel
from tpmflow.planning.cost import hourly_cost
from tpmflow.planning.hardware import Accelerator
from tpmflow.planning.model import ModelSpec
from tpmflow.planning.probe import ProbeTraffic, probe_load
from tpmflow.planning.report import ModelSummary, Plan
from tpmflow.planning.roofline import Decode, Efficiency, decode, efficiency_for
from tpmflow.planning.shape import EngineSettings, Fit, no_fit_message, shapes_that_fit


class Workload(BaseModel):
    """What the pool must serve."""

    context: int = Field(8192, ge=1, description="tokens per sequence, prompt and output (vLLM's max_model_len)")
    concurrent: int = Field(1, ge=1, description="full-context sequences the pool holds at once")
    tokens_per_s: float = Field(0.0, ge=0, description="output tokens/s the pool sustains (0: no target)")
    replica_sequences: int = Field(1, ge=1, description="full-context sequences every replica holds at least")
    prompt_tokens: int = Field(0, ge=0, description="prompt tokens per request (priced)")
    output_tokens: int = Field(256, ge=1, description="output tokens per request: requests/s = tokens_per_s / this")
    decode_context: int | None = Field(
        None, ge=1, description="KV tokens a decode step reads per sequence (None: the full context, the worst case)"
    )


class _Sized(BaseModel):
    fit: Fit
    replicas: int
    batch: int
    rate: Decode
    total_nodes: int


def plan(
    model: ModelSpec,
    acc: Accelerator,
    workload: Workload | None = None,
    *,
    engine: EngineSettings | None = None,
    probe: ProbeTraffic | None = None,
    costs: CostModel | None = None,
    service_class: str = "interactive",
    max_nodes: int = 16,
    efficiency: float | None = None,
    max_activation_bytes: int | None = None,
) -> Plan:
    """Plan a pool of ``model`` on ``acc`` for ``workload``.

    Raises:
        ValueError: when no shape up to ``max_nodes`` nodes holds the model and one full-context sequence.
    """
    workload = workload or Workload()
    engine = engine or EngineSettings()
    eff = efficiency_for(acc, efficiency)
    smallest: Fit | None = None
    best: _Sized | None = None
    for shape in shapes_that_fit(
        model,
        acc,
        context=workload.context,
        sequences=workload.replica_sequences,
        engine=engine,
        max_nodes=max_nodes,
    ):
        smallest = smallest or shape
        if best is not None and shape.nodes >= best.total_nodes:
            break
        sized = _size(model, acc, shape, workload, engine, eff)
        if best is None or sized.total_nodes < best.total_nodes:
            best = sized
    if smallest is None or best is None:
        raise ValueError(
            no_fit_message(
                model,
                acc,
                context=workload.context,
                sequences=workload.replica_sequences,
                engine=engine,
                max_nodes=max_nodes,
            )
        )

    notes: list[str] = []
    if best.fit is not smallest:
        notes.append(
            f"the smallest shape, {smallest.label} on {smallest.nodes} node(s), holds {smallest.max_sequences} "
            f"sequence(s) of {workload.context} tokens; {best.fit.label} meets the targets on fewer nodes"
        )
    warnings: list[str] = []
    pool_rate = best.replicas * best.rate.tokens_per_s
    out_rate = workload.tokens_per_s or pool_rate
    if workload.tokens_per_s and pool_rate < workload.tokens_per_s:
        warnings.append(f"{best.replicas} replicas reach {pool_rate:.0f} output tokens/s, under the target")

    load = None
    activation_rate = 0.0
    if probe is not None:
        load = probe_load(model, probe, max_activation_bytes)
        activation_rate = load.bytes_per_request * probe.requests_per_s
        warnings += load.problems
    in_flight = best.replicas * best.batch
    cost = hourly_cost(
        costs or CostModel(),
        service_class,
        output_tokens_per_s=out_rate,
        prompt_tokens_per_s=out_rate / workload.output_tokens * workload.prompt_tokens,
        activation_bytes_per_s=activation_rate,
        in_flight=in_flight,
    )
    return Plan(
        model=ModelSummary.of(model, workload.context, engine.kv_cache_dtype),
        hardware=acc,
        workload=workload.model_dump(),
        engine=engine,
        smallest=smallest,
        shape=best.fit,
        replicas=best.replicas,
        total_nodes=best.total_nodes,
        batch_per_replica=best.batch,
        decode=best.rate,
        decode_one=_rate(model, acc, best.fit, workload, engine, eff, 1),
        efficiency=eff,
        pool_tokens_per_s=pool_rate,
        probe=load,
        cost=cost,
        notes=notes,
        warnings=warnings,
    )


def _rate(
    model: ModelSpec,
    acc: Accelerator,
    shape: Fit,
    workload: Workload,
    engine: EngineSettings,
    eff: Efficiency,
    batch: int,
) -> Decode:
    return decode(
        model,
        acc,
        shape.tp,
        shape.pp,
        batch=batch,
        context=workload.decode_context or workload.context,
        efficiency=eff.value,
        kv_dtype=engine.kv_cache_dtype,
    )


def _size(
    model: ModelSpec, acc: Accelerator, shape: Fit, workload: Workload, engine: EngineSettings, eff: Efficiency
) -> _Sized:
    """Replicas of this shape the targets need, and the batch each then runs."""
    cap = max(1, shape.max_sequences)
    full = _rate(model, acc, shape, workload, engine, eff, cap)
    replicas = math.ceil(workload.concurrent / cap)
    if workload.tokens_per_s:
        replicas = max(replicas, math.ceil(workload.tokens_per_s / full.tokens_per_s))
    batch = math.ceil(workload.concurrent / replicas)
    if workload.tokens_per_s:  # the fewest sequences per replica that reach the target (rate grows with batch)
        lo, hi = batch, cap
        while lo < hi:
            mid = (lo + hi) // 2
            if replicas * _rate(model, acc, shape, workload, engine, eff, mid).tokens_per_s >= workload.tokens_per_s:
                hi = mid
            else:
                lo = mid + 1
        batch = lo
    per_node = acc.per_node // shape.devices if shape.nodes == 1 else 0
    total = math.ceil(replicas / per_node) if per_node else replicas * shape.nodes
    rate = full if batch == cap else _rate(model, acc, shape, workload, engine, eff, batch)
    return _Sized(fit=shape, replicas=replicas, batch=batch, rate=rate, total_nodes=total)
