"""A tpmflow pool config as the planner reads it: its model, the vLLM settings that decide memory,
its prices, and whether the shape it runs its replicas in can hold the model at all."""

from __future__ import annotations

import math
from pathlib import Path

from tpmflow.config import PoolConfig
from tpmflow.paths import models_dir
from tpmflow.planning.hardware import Accelerator
from tpmflow.planning.model import ModelSpec
from tpmflow.planning.roofline import decode, efficiency_for
from tpmflow.planning.shape import EngineSettings, fit


def model_folder(name: str) -> Path:
    """The folder of a model given as a path (folder or ``config.json``) or a tpmflow cache name.

    Raises:
        ValueError: when neither has a ``config.json``.
    """
    path = Path(name).expanduser()
    for candidate in (path, path.parent if path.name == "config.json" else None, models_dir() / name):
        if candidate is not None and (candidate / "config.json").is_file():
            return candidate
    raise ValueError(f"model {name!r}: no config.json there nor in {models_dir()}; give --model or --arch")


def pool_engine(cfg: PoolConfig, gpu_memory_utilization: float | None = None) -> EngineSettings:
    """The pool's memory settings, vLLM's defaults where it sets none."""
    util = gpu_memory_utilization or cfg.engine.gpu_memory_utilization or 0.9
    return EngineSettings(gpu_memory_utilization=util, max_num_seqs=cfg.engine.max_num_seqs or 256)


def pool_warnings(
    model: ModelSpec,
    acc: Accelerator,
    cfg: PoolConfig,
    engine: EngineSettings,
    *,
    concurrent: int = 1,
    tokens_per_s: float = 0.0,
) -> list[str]:
    """What is wrong with serving ``model`` on ``acc`` as ``cfg`` configures it (empty: nothing)."""
    tp, pp, ctx = cfg.engine.tensor_parallel_size, cfg.engine.pipeline_parallel_size, cfg.engine.max_model_len
    where = f"pool {cfg.name!r} (TP={tp} x PP={pp}, max_model_len {ctx})"
    warnings = []
    if tp > acc.per_node:
        warnings.append(
            f"{where}: tensor_parallel_size {tp} spans nodes of {acc.per_node} {acc.name}; "
            "vLLM's docs keep it inside a node and add pipeline stages across nodes"
        )
    nodes, per_node = cfg.engine.nodes, cfg.engine.ranks_per_node
    if per_node > acc.per_node:
        warnings.append(
            f"{where}: {tp * pp} ranks over {nodes} node(s) put {per_node} on each, more than a node's "
            f"{acc.per_node} {acc.name}; set engine.nodes to {math.ceil(tp * pp / acc.per_node)}"
        )
    shape = fit(model, acc, tp, pp, context=ctx, engine=engine)
    if not shape.fits:
        warnings.append(f"{where} cannot hold {model.name}: " + "; ".join(shape.problems))
        return warnings
    if shape.max_sequences * cfg.replicas < concurrent:
        warnings.append(
            f"{where}: {cfg.replicas} replica(s) hold {shape.max_sequences * cfg.replicas} full-context "
            f"sequences at once, under the {concurrent} asked for"
        )
    if tokens_per_s:
        rate = decode(
            model, acc, tp, pp, batch=shape.max_sequences, context=ctx, efficiency=efficiency_for(acc).value
        ).tokens_per_s
        if rate * cfg.replicas < tokens_per_s:
            need = math.ceil(tokens_per_s / rate)
            warnings.append(
                f"{where}: {cfg.replicas} replica(s) decode ~{rate * cfg.replicas:,.0f} tokens/s, under the "
                f"target {tokens_per_s:,.0f}; this shape needs {need}"
            )
    return warnings
