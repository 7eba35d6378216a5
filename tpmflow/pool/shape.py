"""Is a replica's shape (tensor x pipeline parallel) one the model can be split into? Checked at
pool start, from the model's ``config.json``, so a bad shape is refused with the reason instead of
every replica failing inside vLLM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tpmflow.config import PoolConfig


def shape_problems(config: dict[str, Any], tensor_parallel: int, pipeline_parallel: int) -> list[str]:
    """Why a model with this Hugging Face ``config`` cannot be split so (empty: it can)."""
    text = config.get("text_config") or config

    def first(*names: str) -> int:  # Hugging Face configs spell these several ways (GPT-2, Falcon)
        return next((int(text[n]) for n in names if text.get(n)), 0)

    heads = first("num_attention_heads", "n_head", "num_heads")
    kv_heads = first("num_key_value_heads", "num_kv_heads", "n_head_kv") or heads
    layers = first("num_hidden_layers", "n_layer", "num_layers")
    problems = []
    if heads and heads % tensor_parallel:
        problems.append(f"its {heads} attention heads do not divide over tensor_parallel_size {tensor_parallel}")
    # vLLM splits KV heads over the ranks, or copies each to several ranks when there are fewer.
    if kv_heads and kv_heads % tensor_parallel and tensor_parallel % kv_heads:
        problems.append(
            f"its {kv_heads} key/value heads neither divide over tensor_parallel_size {tensor_parallel} nor divide it"
        )
    if layers and layers < pipeline_parallel:
        problems.append(f"its {layers} layers cannot fill {pipeline_parallel} pipeline stages")
    return problems


def check_shape(model_dir: Path, tensor_parallel: int, pipeline_parallel: int) -> None:
    """Raise ``ValueError`` naming every reason the model in ``model_dir`` cannot take this shape."""
    path = Path(model_dir) / "config.json"
    if (tensor_parallel, pipeline_parallel) == (1, 1) or not path.is_file():
        return
    problems = shape_problems(json.loads(path.read_text()), tensor_parallel, pipeline_parallel)
    if problems:
        raise ValueError(
            f"engine shape TP={tensor_parallel} x PP={pipeline_parallel} does not fit {model_dir.name}: "
            + "; ".join(problems)
        )


def check_pool_shape(cfg: PoolConfig) -> None:
    """Every replica's model against the pool's engine shape (both launchers call this before any
    start); an unsplit pool has nothing to check."""
    from tpmflow.versioning.checkout import replica_model_dir

    if cfg.engine.ranks == 1:
        return
    for slot in cfg.slots():
        check_shape(
            replica_model_dir(cfg, slot.index), cfg.engine.tensor_parallel_size, cfg.engine.pipeline_parallel_size
        )
