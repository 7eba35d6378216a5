"""``tpmflow plan`` without the command line: where the model, settings and prices come from
(a ``config.json``, explicit numbers, a pool config) and the plan of them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from tpmflow.access.costs import CostModel
from tpmflow.config import PoolConfig
from tpmflow.planning.hardware import lookup
from tpmflow.planning.model import ModelSpec
from tpmflow.planning.planner import Workload, plan
from tpmflow.planning.pool_config import model_folder, pool_engine, pool_warnings
from tpmflow.planning.probe import ProbeTraffic
from tpmflow.planning.report import Plan
from tpmflow.planning.shape import EngineSettings


class PlanRequest(BaseModel):
    """The command's options; ``None`` means: the pool config's value, else the default."""

    model: str | None = Field(None, description="a config.json, a model folder, or a tpmflow cache name")
    arch: str | None = Field(None, description="explicit numbers: 'layers=80,hidden=8192,heads=64,...'")
    config: str | None = Field(None, description="a pool config YAML: its model, settings and prices")
    layout: str | None = Field(None, description="one of the config's layouts (its `layouts:` section)")
    hardware: str
    dtype: str | None = None
    context: int | None = Field(None, ge=1)
    concurrent: int = Field(1, ge=1)
    tokens_per_s: float = Field(0.0, ge=0)
    replica_sequences: int = Field(1, ge=1)
    prompt_tokens: int = Field(0, ge=0)
    output_tokens: int = Field(256, ge=1)
    decode_context: int | None = Field(None, ge=1)
    probe_layers: int | None = Field(None, ge=1)
    probe_sites: int = Field(1, ge=1)
    probe_positions: int | None = Field(None, ge=1)
    probe_rate: float = Field(0.0, ge=0)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    kv_cache_dtype: str | None = None
    max_nodes: int = Field(16, ge=1)
    efficiency: float | None = Field(None, gt=0, le=1)
    service_class: str = "interactive"


def parse_arch(text: str) -> dict[str, str]:
    """``'layers=80,hidden=8192'`` as a dict; raises ``ValueError`` on an item without ``=``."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in items if "=" not in item]
    if bad:
        raise ValueError(f"--arch takes key=value items separated by commas; got {', '.join(bad)}")
    return {k.strip(): v.strip() for k, v in (item.split("=", 1) for item in items)}


def run(request: PlanRequest) -> Plan:
    """The plan the options ask for, with the pool config's problems among its warnings.

    Raises:
        ValueError: on a missing or unreadable model, unknown hardware, or a model nothing holds.
    """
    cfg = PoolConfig.from_yaml(request.config, request.layout) if request.config else None
    acc = lookup(request.hardware)
    dtype = request.dtype or (cfg.engine.dtype if cfg else None)
    if request.arch:
        model = ModelSpec.from_params(parse_arch(request.arch), dtype=dtype)
    elif request.model or cfg:
        name = request.model or (cfg.model if cfg else "")
        model = ModelSpec.from_file(model_folder(name), dtype=dtype)
    else:
        raise ValueError("say which model: --model (a config.json or model folder), --arch, or --config (a pool)")
    engine = pool_engine(cfg, request.gpu_memory_utilization) if cfg else EngineSettings()
    if request.gpu_memory_utilization:
        engine = engine.model_copy(update={"gpu_memory_utilization": request.gpu_memory_utilization})
    if request.kv_cache_dtype:
        engine = engine.model_copy(update={"kv_cache_dtype": request.kv_cache_dtype})
    context = request.context or (cfg.engine.max_model_len if cfg else 8192)
    workload = Workload(
        context=context,
        concurrent=request.concurrent,
        tokens_per_s=request.tokens_per_s,
        replica_sequences=request.replica_sequences,
        prompt_tokens=request.prompt_tokens,
        output_tokens=request.output_tokens,
        decode_context=request.decode_context,
    )
    probe = None
    if request.probe_layers:
        probe = ProbeTraffic(
            layers=request.probe_layers,
            sites=request.probe_sites,
            positions=request.probe_positions or context,
            requests_per_s=request.probe_rate,
        )
    limit: Any = PoolConfig.model_fields["max_activation_bytes"].default
    result = plan(
        model,
        acc,
        workload,
        engine=engine,
        probe=probe,
        costs=cfg.costs if cfg else CostModel(),
        service_class=request.service_class,
        max_nodes=request.max_nodes,
        efficiency=request.efficiency,
        max_activation_bytes=cfg.max_activation_bytes if cfg else int(limit),
    )
    if cfg:
        result.warnings += pool_warnings(
            model, acc, cfg, engine, concurrent=request.concurrent, tokens_per_s=request.tokens_per_s
        )
    return result
