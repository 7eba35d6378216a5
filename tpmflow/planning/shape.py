"""The shapes (tensor x pipeline parallel) a replica can take on an accelerator, in the order vLLM's
docs recommend, and whether the model fits each with its KV cache.

vLLM's guidance: a model that fits one device runs unsplit; one that fits a node splits with
tensor parallelism inside it; a bigger one keeps tensor parallelism inside each node (as wide as the
node allows) and adds pipeline stages across nodes. Tensor parallelism must divide the attention
heads (``tpmflow.pool.shape.shape_problems``), so a 12-tile Aurora node runs a 128-head model at TP=8.

Memory per device, as vLLM budgets it: ``gpu_memory_utilization`` x device memory must hold the
rank's weights, the activations of its profiling pass (``max_num_batched_tokens`` tokens), the
runtime's own buffers, and the KV cache of at least the required full-context sequences. The rest
of the budget is KV cache too: it sets how many full-context sequences a replica holds at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from pydantic import BaseModel, Field

from tpmflow.planning.hardware import Accelerator
from tpmflow.planning.model import ModelSpec
from tpmflow.pool.shape import shape_problems

GIB = 2**30


class EngineSettings(BaseModel):
    """The vLLM settings that decide memory (defaults: vLLM's own for its OpenAI server)."""

    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_num_seqs: int = Field(256, ge=1, description="sequences a replica batches at most")
    max_num_batched_tokens: int = Field(8192, ge=1, description="tokens of one step: the activation profile")
    kv_cache_dtype: str | None = Field(None, description="None: the model's compute dtype (vLLM's 'auto')")


class Fit(BaseModel):
    """One shape's memory per device (its fullest stage) at a context length."""

    tp: int
    pp: int
    nodes: int
    devices: int
    budget_gib: float
    weights_gib: float
    activations_gib: float
    runtime_gib: float
    kv_gib_per_sequence: float
    max_sequences: int = Field(description="full-context sequences one replica holds (at most max_num_seqs)")
    fits: bool
    problems: list[str] = Field(default_factory=list)

    @property
    def label(self) -> str:
        return f"TP={self.tp} x PP={self.pp}"


def nodes_for(tp: int, pp: int, per_node: int) -> int:
    """Nodes a replica spans: each node holds whole tensor-parallel groups (stages)."""
    return math.ceil(pp / max(1, per_node // tp))


def stage_layers(layers: int, pp: int) -> list[range]:
    """The layers of each pipeline stage, split as vLLM's ``get_pp_indices`` does: evenly, the
    remainder one each to the stages before the last (which also holds the unembedding)."""
    parts = [layers // pp] * pp
    for i in range(2, layers % pp + 2):
        parts[-i] += 1
    starts = [sum(parts[:s]) for s in range(pp)]
    return [range(start, start + n) for start, n in zip(starts, parts, strict=True)]


def activation_bytes(model: ModelSpec, tp: int, engine: EngineSettings) -> float:
    """Peak activations of vLLM's profiling step on one rank (an estimate): per token, the residual
    stream and attention's tensors (~4 x hidden) plus the widest MLP intermediate on this rank
    (for an MoE, the routed copies of each token too), and the sampler's float32 logits."""
    gate = 2 if model.gated_mlp else 1
    widest = gate * model.intermediate / tp if (not model.is_moe or model.dense_layers) else 0.0
    if model.is_moe:
        k = model.experts_per_token
        routed = k * model.hidden + gate * (k * model.expert_intermediate + model.shared_intermediate) / tp
        widest = max(widest, routed)
    per_token = (4 * model.hidden + widest) * model.compute_bytes
    return engine.max_num_batched_tokens * per_token + engine.max_num_seqs * model.vocab * 4


def fit(
    model: ModelSpec,
    acc: Accelerator,
    tp: int,
    pp: int,
    *,
    context: int,
    sequences: int = 1,
    engine: EngineSettings | None = None,
) -> Fit:
    """Memory of ``model`` split TP x PP on ``acc`` holding ``sequences`` sequences of ``context`` tokens."""
    engine = engine or EngineSettings()
    problems = shape_problems(_heads_config(model), tp, pp)
    budget = engine.gpu_memory_utilization * acc.memory_gib * GIB
    act = activation_bytes(model, tp, engine)
    runtime = acc.runtime_gib * GIB
    kv_layer = model.kv_bytes_per_token_layer(tp, engine.kv_cache_dtype) * context
    stages = stage_layers(model.layers, pp) if pp <= model.layers else [range(model.layers)]
    weights, kv_seq, room = 0.0, 0.0, math.inf
    for s, layers in enumerate(stages):
        w = sum(model.layer_bytes(i, tp) for i in layers)
        if s == 0:
            w += model.embedding_bytes(tp)
        if s == len(stages) - 1:
            w += model.head_bytes(tp, pipeline=pp > 1) + model.hidden * model.compute_bytes
        kv = kv_layer * len(layers)
        weights, kv_seq = max(weights, w), max(kv_seq, kv)
        room = min(room, (budget - w - act - runtime) / kv if kv else math.inf)
    max_seqs = max(0, min(engine.max_num_seqs, math.floor(room)))
    fits = not problems and max_seqs >= sequences
    if not problems and not fits:
        need = weights + act + runtime + sequences * kv_seq
        problems.append(
            f"TP={tp} x PP={pp} needs {need / GIB:.1f} GiB per device ({weights / GIB:.1f} weights, "
            f"{sequences * kv_seq / GIB:.1f} KV cache of {sequences} x {context} tokens, "
            f"{(act + runtime) / GIB:.1f} activations and runtime); {acc.name} gives {budget / GIB:.1f} GiB "
            f"at gpu_memory_utilization {engine.gpu_memory_utilization:g}"
        )
    return Fit(
        tp=tp,
        pp=pp,
        nodes=nodes_for(tp, pp, acc.per_node),
        devices=tp * pp,
        budget_gib=budget / GIB,
        weights_gib=weights / GIB,
        activations_gib=act / GIB,
        runtime_gib=acc.runtime_gib,
        kv_gib_per_sequence=kv_seq / GIB,
        max_sequences=max_seqs,
        fits=fits,
        problems=problems,
    )


def candidates(model: ModelSpec, acc: Accelerator, max_nodes: int) -> Iterator[tuple[int, int]]:
    """Shapes in the order vLLM's docs recommend: one node (tensor parallel alone, smallest first;
    then pipeline stages inside the node), then 2, 3 ... nodes, each with the widest tensor
    parallelism a node allows first and the fewest stages."""
    tps = tensor_parallel_sizes(model, acc)
    yield from ((tp, 1) for tp in tps)
    inside = [(tp, pp) for tp in tps for pp in range(2, acc.per_node // tp + 1) if pp <= model.layers]
    yield from sorted(inside, key=lambda s: (s[0] * s[1], -s[0]))
    for n in range(2, max_nodes + 1):
        for tp in sorted(tps, reverse=True):
            per_node = acc.per_node // tp
            for pp in range((n - 1) * per_node + 1, min(n * per_node, model.layers) + 1):
                yield tp, pp


def tensor_parallel_sizes(model: ModelSpec, acc: Accelerator) -> list[int]:
    """Tensor-parallel sizes a node can hold that the model's heads divide over."""
    heads = _heads_config(model)
    return [tp for tp in range(1, acc.per_node + 1) if not shape_problems(heads, tp, 1)]


def shapes_that_fit(
    model: ModelSpec,
    acc: Accelerator,
    *,
    context: int,
    sequences: int = 1,
    engine: EngineSettings | None = None,
    max_nodes: int = 16,
) -> Iterator[Fit]:
    """The shapes worth choosing among, smallest first: every one-node shape that holds the model
    and ``sequences`` full-context sequences, then the preferred such shape on 2, 3 ... nodes."""
    seen_nodes = 0
    for tp, pp in candidates(model, acc, max_nodes):
        if nodes_for(tp, pp, acc.per_node) <= seen_nodes:
            continue  # a bigger replica has its preferred shape on this many nodes already
        shape = fit(model, acc, tp, pp, context=context, sequences=sequences, engine=engine)
        if shape.fits:
            seen_nodes = max(seen_nodes, shape.nodes if shape.nodes > 1 else 0)
            yield shape


def no_fit_message(
    model: ModelSpec,
    acc: Accelerator,
    *,
    context: int,
    sequences: int = 1,
    engine: EngineSettings | None = None,
    max_nodes: int = 16,
) -> str:
    """Why nothing fits, told by the largest shape tried: the widest TP, as many stages as allowed."""
    tps = tensor_parallel_sizes(model, acc)
    if not tps:
        return f"{model.name}'s {model.heads} attention heads divide over no tensor-parallel size up to {acc.per_node}"
    tp = tps[-1]
    pp = min(model.layers, max_nodes * (acc.per_node // tp))
    largest = fit(model, acc, tp, pp, context=context, sequences=sequences, engine=engine)
    why = largest.problems[-1] if largest.problems else largest.label
    return (
        f"{model.name} does not fit on {max_nodes} {acc.name} node(s) of {acc.per_node} with {sequences} "
        f"sequence(s) of {context} tokens: the largest shape tried, {why}. "
        "Allow more nodes (--max-nodes), a shorter context or a smaller dtype."
    )


def _heads_config(model: ModelSpec) -> dict[str, int]:
    """The keys of a Hugging Face config that ``shape_problems`` checks."""
    return {
        "num_attention_heads": model.heads,
        "num_key_value_heads": model.kv_heads,
        "num_hidden_layers": model.layers,
    }
