"""A decoder's architecture, read from its Hugging Face ``config.json`` or given key by key, and
what it weighs: parameters (total and, for a mixture of experts, active per token), bytes of
weights, and bytes of KV cache per token.

Counts come from the architecture, not from a name, so a config the planner has never seen still
plans. Biases are left out (under 0.1% of any large model); everything else a vLLM rank holds is
counted, including the parts it replicates instead of splitting (see :meth:`ModelSpec.attention_params`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

# Bytes per value of each storage type (int4 / mxfp4 packs two values a byte; scales are ignored).
DTYPE_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float8": "fp8",
    "fp8_e4m3": "fp8",
    "e4m3": "fp8",
    "fp8_e5m2": "fp8",
    "w8a8": "int8",
    "w4a16": "int4",
    "mxfp4": "int4",
    "nvfp4": "int4",
}

# Spellings of one quantity across Hugging Face configs (Llama/Qwen/Mistral, GPT-2, Falcon, DeepSeek).
_KEYS: dict[str, tuple[str, ...]] = {
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "vocab": ("vocab_size",),
}


def dtype_name(value: str) -> str:
    """The canonical name (``bf16``, ``fp8``, ...) of a dtype or quantisation spelling."""
    name = str(value).lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {value!r}; known: {', '.join(DTYPE_BYTES)}")
    return name


class ModelSpec(BaseModel):
    """What the planner needs to know of a decoder. Sizes are counts (not bytes) unless named so."""

    model_config = ConfigDict(frozen=True)

    name: str = "model"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int = 0  # width of a dense MLP (the leading dense layers of an MoE)
    gated_mlp: bool = True  # gate + up + down (Llama); False: up + down (GPT-2, Falcon)
    tied_embeddings: bool = False
    position_embeddings: int = 0  # rows of learned positions (GPT-2); 0 with rotary positions
    experts: int = 0  # routed experts per MoE layer (0: a dense model)
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # total width of the experts every token runs through
    dense_layers: int = 0  # leading layers of an MoE that keep a dense MLP (DeepSeek first_k_dense_replace)
    q_lora_rank: int = 0  # multi-head latent attention (DeepSeek-V2/V3, Kimi K2) when kv_lora_rank > 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    dtype: str = "bf16"  # storage of the decoder blocks' linear weights
    compute_dtype: str = "bf16"  # embeddings, norms, routers, activations, KV cache by default
    unquantized: tuple[str, ...] = ()  # blocks a quantised checkpoint keeps in compute_dtype: "attention", "mlp"

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        """Numbers a real decoder can have (a ValueError naming each one that cannot be)."""
        problems = [f"{k} must be positive" for k in ("hidden", "layers", "heads", "kv_heads", "head_dim", "vocab")
                    if getattr(self, k) <= 0]  # fmt: skip
        problems += [f"{k} must not be negative" for k, v in self if isinstance(v, int) and v < 0]
        if self.kv_heads > 0 and self.heads % self.kv_heads:
            problems.append(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.experts and not (self.experts_per_token and self.expert_intermediate):
            problems.append("an MoE needs experts_per_token and expert_intermediate with experts")
        if self.experts_per_token > self.experts:
            problems.append(f"experts_per_token ({self.experts_per_token}) exceeds experts ({self.experts})")
        if problems:
            raise ValueError("; ".join(dict.fromkeys(problems)))
        return self

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], *, name: str = "model", dtype: str | None = None) -> ModelSpec:
        """The spec of a Hugging Face ``config.json`` (a multimodal one's ``text_config``).

        Raises:
            ValueError: naming every key the planner needs and the config lacks.
        """
        text = config.get("text_config") or config

        def first(*names: str) -> Any:
            return next((text[n] for n in names if text.get(n) is not None), None)

        found = {k: first(*names) for k, names in _KEYS.items()}
        missing = [" / ".join(_KEYS[k]) for k, v in found.items() if not v]
        hidden = int(found["hidden"] or 0)
        experts = int(first("n_routed_experts", "num_local_experts", "num_experts") or 0)
        expert_width = int(first("moe_intermediate_size") or (text.get("intermediate_size") if experts else 0) or 0)
        gated = "n_embd" not in text and text.get("model_type") not in ("gpt2", "falcon", "gpt_neox", "gptj")
        intermediate = first("intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim")
        if intermediate is None and not gated and hidden:
            intermediate = 4 * hidden  # GPT-2's n_inner: null, Falcon's default
        if intermediate is None and not experts:
            missing.append("intermediate_size")
        if missing:
            raise ValueError(f"config of {name} lacks {', '.join(missing)}: the planner needs them")
        heads = int(found["heads"])
        if text.get("multi_query") and not text.get("new_decoder_architecture"):
            kv_heads = 1  # Falcon-7B's multi-query attention
        else:
            kv_heads = int(first("num_key_value_heads", "num_kv_heads", "n_head_kv") or heads)
        shared = int(first("shared_expert_intermediate_size") or 0)
        if not shared and experts:
            shared = int(first("n_shared_experts") or 0) * expert_width
        return cls(
            name=name,
            hidden=hidden,
            layers=int(found["layers"]),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=int(first("head_dim") or hidden // heads),
            vocab=int(found["vocab"]),
            intermediate=int(intermediate or 0),
            gated_mlp=gated,
            # transformers ties the embeddings unless the config says otherwise
            tied_embeddings=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", True))),
            position_embeddings=int(first("n_positions") or 0) if "n_embd" in text else 0,
            experts=experts,
            experts_per_token=int(first("num_experts_per_tok", "num_experts_per_token", "moe_topk") or 0),
            expert_intermediate=expert_width if experts else 0,
            shared_intermediate=shared,
            dense_layers=int(first("first_k_dense_replace") or 0) if experts else 0,
            q_lora_rank=int(first("q_lora_rank") or 0),
            kv_lora_rank=int(first("kv_lora_rank") or 0),
            qk_rope_head_dim=int(first("qk_rope_head_dim") or 0),
            qk_nope_head_dim=int(first("qk_nope_head_dim") or 0),
            v_head_dim=int(first("v_head_dim") or 0),
            **_storage(config, text, dtype),
        )

    @classmethod
    def from_file(cls, path: str | Path, *, dtype: str | None = None) -> ModelSpec:
        """The spec of a ``config.json``, or of the one in a model folder."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"no config.json at {path}")
        name = file.parent.name if file.name == "config.json" else file.stem
        return cls.from_hf_config(json.loads(file.read_text()), name=name, dtype=dtype)

    @classmethod
    def from_params(cls, params: dict[str, Any], *, name: str = "model", dtype: str | None = None) -> ModelSpec:
        """A spec from explicit numbers: ``layers, hidden, heads, vocab, intermediate`` and optionally
        ``kv_heads, head_dim, experts, experts_per_token, expert_intermediate, shared_intermediate,
        dense_layers, kv_lora_rank, qk_rope_head_dim, q_lora_rank, qk_nope_head_dim, v_head_dim, tied``.

        Raises:
            ValueError: naming missing or unknown keys.
        """
        known = set(cls.model_fields) - {"name", "dtype", "compute_dtype", "unquantized", "tied_embeddings"}
        unknown = sorted(set(params) - known - {"tied"})
        if unknown:
            raise ValueError(f"unknown model parameters {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        needed = ["layers", "hidden", "heads", "vocab"] + ([] if params.get("experts") else ["intermediate"])
        missing = [k for k in needed if not params.get(k)]
        if missing:
            raise ValueError(f"model parameters lack {', '.join(missing)}")
        values: dict[str, Any] = {}
        for k, v in params.items():
            if k not in known:
                continue
            try:
                values[k] = _flag(v) if k == "gated_mlp" else int(v)
            except ValueError:
                raise ValueError(f"model parameter {k}={v!r} is not a whole number") from None
        values.setdefault("kv_heads", values["heads"])
        values.setdefault("head_dim", values["hidden"] // values["heads"] if values["heads"] > 0 else 0)
        storage = dtype_name(dtype or "bf16")
        compute = "bf16" if DTYPE_BYTES[storage] < 2 else storage
        tied = _flag(params.get("tied", False))
        return cls(name=name, tied_embeddings=tied, dtype=storage, compute_dtype=compute, **values)

    # -- parameters ------------------------------------------------------------------------------

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.is_moe else 0

    def attention_params(self) -> tuple[int, int]:
        """Parameters of one layer's attention: (split over tensor-parallel ranks, copied to every rank).

        vLLM keeps MLA's down-projections (``q_a_proj``, ``kv_a_proj_with_mqa``) and their norms whole
        on every rank, since their outputs are the small latent every head reads.
        """
        h = self.hidden
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            copied = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            if self.q_lora_rank:
                copied += h * self.q_lora_rank + self.q_lora_rank
                split = self.q_lora_rank * self.heads * qk
            else:
                split = h * self.heads * qk
            split += self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.v_head_dim)
            split += self.heads * self.v_head_dim * h
            return split, copied
        q_and_o = 2 * h * self.heads * self.head_dim
        return q_and_o + 2 * h * self.kv_heads * self.head_dim, 0

    def mlp_params(self, width: int) -> int:
        return (3 if self.gated_mlp else 2) * self.hidden * width

    def layer_params(self, index: int, *, active: bool = False) -> int:
        """Parameters of layer ``index`` (``active``: those one token runs through)."""
        split, copied = self.attention_params()
        total = split + copied + 2 * self.hidden  # two norms
        if not self.is_moe or index < self.dense_layers:
            return total + self.mlp_params(self.intermediate)
        routed = self.experts_per_token if active else self.experts
        return total + routed * self.mlp_params(self.expert_intermediate) + self.moe_fixed_params()

    def moe_fixed_params(self) -> int:
        """An MoE layer's always-on MLP parameters: shared experts and the router."""
        return self.mlp_params(self.shared_intermediate) + self.experts * self.hidden

    def embedding_params(self) -> int:
        return (self.vocab + self.position_embeddings) * self.hidden

    def head_params(self) -> int:
        """The unembedding's own parameters (0 when tied to the embedding)."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def total_params(self) -> int:
        layers = sum(self.layer_params(i) for i in range(self.layers))
        return layers + self.embedding_params() + self.head_params() + self.hidden

    def active_params(self) -> int:
        """Parameters one token runs through (the total for a dense model; embeddings counted whole)."""
        layers = sum(self.layer_params(i, active=True) for i in range(self.layers))
        return layers + self.embedding_params() + self.head_params() + self.hidden

    # -- bytes -----------------------------------------------------------------------------------

    @property
    def weight_bytes_per_param(self) -> float:
        return DTYPE_BYTES[self.dtype]

    @property
    def compute_bytes(self) -> float:
        return DTYPE_BYTES[self.compute_dtype]

    def _linear_bytes(self, part: str) -> float:
        return self.compute_bytes if part in self.unquantized else self.weight_bytes_per_param

    def layer_bytes(self, index: int, tp: int = 1, *, experts_touched: float | None = None) -> float:
        """Bytes of layer ``index`` one of ``tp`` tensor-parallel ranks holds (``experts_touched``:
        bytes it reads when a decode step routes to that many distinct experts)."""
        split, copied = self.attention_params()
        attn = (split / tp + copied) * self._linear_bytes("attention") + 2 * self.hidden * self.compute_bytes
        mlp_b = self._linear_bytes("mlp")
        if not self.is_moe or index < self.dense_layers:
            return attn + self.mlp_params(self.intermediate) / tp * mlp_b
        routed = self.experts if experts_touched is None else experts_touched
        experts = (routed * self.mlp_params(self.expert_intermediate) + self.mlp_params(self.shared_intermediate)) / tp
        return attn + experts * mlp_b + self.experts * self.hidden * self.compute_bytes  # router: whole, unquantised

    def embedding_bytes(self, tp: int = 1) -> float:
        return self.embedding_params() / tp * self.compute_bytes

    def head_bytes(self, tp: int = 1, *, pipeline: bool = False) -> float:
        """The unembedding a rank of the last stage holds (tied: a copy when the embedding is on another stage)."""
        params = self.vocab * self.hidden if (pipeline or not self.tied_embeddings) else 0
        return params / tp * self.compute_bytes

    def weight_bytes(self) -> float:
        """Bytes of every weight, unsplit."""
        layers = sum(self.layer_bytes(i) for i in range(self.layers))
        return layers + self.embedding_bytes() + self.head_bytes() + self.hidden * self.compute_bytes

    def kv_bytes_per_token_layer(self, tp: int = 1, kv_dtype: str | None = None) -> float:
        """KV cache one rank holds per token per layer. MLA caches one latent vector per token that
        every rank keeps whole; grouped-query attention splits its KV heads, each rank keeping at
        least one (vLLM copies a KV head to several ranks when there are fewer heads than ranks)."""
        size = DTYPE_BYTES[dtype_name(kv_dtype)] if kv_dtype else self.compute_bytes
        if self.is_mla:
            return (self.kv_lora_rank + self.qk_rope_head_dim) * size
        return 2 * math.ceil(self.kv_heads / tp) * self.head_dim * size

    def kv_bytes_per_token(self, kv_dtype: str | None = None) -> float:
        """KV cache of one token over all layers, unsplit."""
        return self.layers * self.kv_bytes_per_token_layer(1, kv_dtype)

    def expected_experts(self, tokens: int) -> float:
        """Distinct experts a decode step of ``tokens`` tokens touches per MoE layer, if routing is
        uniform: each token picks ``experts_per_token`` of ``experts``; bounded by all of them."""
        if not self.is_moe or tokens <= 0:
            return 0.0
        return self.experts * (1 - (1 - self.experts_per_token / self.experts) ** tokens)


def _flag(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def _storage(config: dict[str, Any], text: dict[str, Any], dtype: str | None) -> dict[str, Any]:
    """Weight and compute dtypes of a config: ``quantization_config`` (checkpoint quantisation)
    over ``torch_dtype``, or ``dtype`` when the caller gives one (e.g. vLLM's ``--dtype``)."""
    raw = text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or "bfloat16"
    compute = dtype_name(raw)
    quant = config.get("quantization_config") or text.get("quantization_config")
    storage, unquantized = _quantised(quant, int(text.get("num_hidden_layers") or 0)) if quant else (None, ())
    if dtype not in (None, "auto"):
        chosen = dtype_name(dtype)
        if DTYPE_BYTES[chosen] >= 2:
            compute = chosen  # vLLM's --dtype: the compute type; a quantised checkpoint stays quantised
        else:
            storage, unquantized = chosen, ()  # quantised on load (vLLM's --quantization fp8)
    if DTYPE_BYTES[compute] < 2:
        compute = "bf16"
    return {"dtype": storage or compute, "compute_dtype": compute, "unquantized": unquantized}


def _kept_blocks(keep: list[str], layers: int) -> tuple[str, ...]:
    """The blocks (``attention``, ``mlp``) a checkpoint keeps unquantised in most layers.

    Ignore lists name modules per layer (Meta's FP8 405B: every layer's attention, the MLP of its
    first and last layers only) or by pattern; routers (``mlp.gate``) and ``lm_head`` are small and
    stay in the compute dtype anyway. A block counts when a pattern without a layer index names it
    or when over half of the layers keep it: the rest is a rounding error in a plan.
    """
    kept = []
    for part, key in (("attention", "attn"), ("mlp", "mlp")):
        names = [m for m in keep if key in m and not re.search(r"(mlp\.gate|router)\W*$", m)]
        indexed = {int(found.group(1)) for m in names if (found := re.search(r"layers\.(\d+)\.", m))}
        everywhere = any(not re.search(r"layers\.\d+\.", m) for m in names)
        if everywhere or (layers and 2 * len(indexed) > layers):
            kept.append(part)
    return tuple(kept)


def _quantised(quant: dict[str, Any], layers: int = 0) -> tuple[str, tuple[str, ...]]:
    """Storage dtype of a ``quantization_config`` and the blocks it leaves unquantised."""
    method = str(quant.get("quant_method", "")).lower()
    keep = [str(m) for m in quant.get("modules_to_not_convert") or quant.get("ignore") or []]
    unquantized = _kept_blocks(keep, layers)
    if method in ("fp8", "fbgemm_fp8"):
        return "fp8", unquantized
    if method in ("awq", "gptq", "marlin", "gptq_marlin", "awq_marlin"):
        return ("int4" if int(quant.get("bits", 4)) <= 4 else "int8"), unquantized
    if method == "bitsandbytes":
        return ("int4" if quant.get("load_in_4bit") else "int8"), unquantized
    if method in ("mxfp4", "nvfp4"):
        return "int4", unquantized
    if method == "modelopt":
        return ("fp8" if "fp8" in str(quant.get("quant_algo", "")).lower() else "int4"), unquantized
    if method == "compressed-tensors":
        bits = [
            int(group.get("weights", {}).get("num_bits", 8))
            for group in (quant.get("config_groups") or {}).values()
            if isinstance(group, dict)
        ]
        return ("int4" if bits and max(bits) <= 4 else "fp8"), unquantized
    raise ValueError(f"unknown quant_method {method!r} in quantization_config; pass the weights' dtype instead")
