"""Tiny random-weight models of the decoder families the probe layouts cover, built locally.

Two layers, hidden 64 (one head of vLLM's supported head_dim 64), fp32, saved with safetensors,
with the character tokenizer of ``tpmflow.models.tiny``. Norm weights and every bias are drawn at
random (not left at 1 and 0), so a layout that skips a norm or a bias shows in the parity tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tpmflow.models.tiny import _build_random
from tpmflow.paths import models_dir

SHAPE = {"hidden": 64, "layers": 2, "heads": 1, "intermediate": 128, "max_positions": 256}


def _common() -> dict[str, Any]:
    s = SHAPE
    return {
        "hidden_size": s["hidden"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "intermediate_size": s["intermediate"],
        "max_position_embeddings": s["max_positions"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def _stablelm(vocab: int) -> Any:
    from transformers import StableLmConfig, StableLmForCausalLM

    return StableLmForCausalLM(StableLmConfig(vocab_size=vocab, num_key_value_heads=1, use_qkv_bias=True, **_common()))


def _opt(vocab: int) -> Any:
    from transformers import OPTConfig, OPTForCausalLM

    c = _common()
    config = OPTConfig(
        vocab_size=vocab,
        hidden_size=c["hidden_size"],
        ffn_dim=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        word_embed_proj_dim=c["hidden_size"],
        max_position_embeddings=c["max_position_embeddings"],
        do_layer_norm_before=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )
    return OPTForCausalLM(config)


def _gpt_neox(vocab: int) -> Any:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, rotary_pct=0.25, use_parallel_residual=True, **_common()))


def _gpt_j(vocab: int) -> Any:
    from transformers import GPTJConfig, GPTJForCausalLM

    # Not in the layout table: the tests' example of a model served without probes.
    c = _common()
    config = GPTJConfig(
        vocab_size=vocab,
        n_embd=c["hidden_size"],
        n_layer=c["num_hidden_layers"],
        n_head=c["num_attention_heads"],
        rotary_dim=16,
        n_positions=c["max_position_embeddings"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )
    return GPTJForCausalLM(config)


def _phi(vocab: int) -> Any:
    from transformers import PhiConfig, PhiForCausalLM

    # Parallel attention + MLP, partial rotary, biases everywhere; vLLM runs it on its Transformers backend.
    return PhiForCausalLM(PhiConfig(vocab_size=vocab, num_key_value_heads=1, partial_rotary_factor=0.5, **_common()))


def _falcon(vocab: int, hidden: int | None = None, heads: int | None = None) -> Any:
    from transformers import FalconConfig, FalconForCausalLM

    c = _common()
    # Falcon-7B's layout: parallel attention + MLP from one layer norm, multi-query attention, biases.
    config = FalconConfig(
        vocab_size=vocab,
        hidden_size=hidden or c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=heads or c["num_attention_heads"],
        parallel_attn=True,
        new_decoder_architecture=False,
        multi_query=True,
        bias=True,
        alibi=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )
    return FalconForCausalLM(config)


def _llama(vocab: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    # Heads, KV heads and layers divisible by 2: the model the split-replica tests cut in two.
    # (head_dim 64: vLLM's CPU attention kernels take no smaller one).
    shape = {**_common(), "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2}
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, num_key_value_heads=2, **shape))


def _mistral(vocab: int) -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(vocab_size=vocab, num_key_value_heads=1, sliding_window=None, **_common()))


def _qwen3(vocab: int) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # Qwen3 normalises queries and keys per head (q_norm, k_norm): randomised like every norm.
    return Qwen3ForCausalLM(
        Qwen3Config(vocab_size=vocab, num_key_value_heads=1, head_dim=64, use_sliding_window=False, **_common())
    )


def _deepseek_v3(vocab: int) -> Any:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    c = _common()
    # DeepSeek-V3 / Kimi K2 in miniature: multi-head latent attention (compressed KV, decoupled
    # rotary part) and a mixture of experts with a shared expert; layer 0 dense, layer 1 MoE.
    config = DeepseekV3Config(
        vocab_size=vocab,
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        moe_intermediate_size=32,
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        # What Hugging Face's DeepSeek-V3 always does (sigmoid scores, a learnt correction bias on
        # them for choosing experts): spelt out, because vLLM reads these names to build the same.
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        first_k_dense_replace=1,
        # DeepSeek-V3's own latent sizes: vLLM's CPU MLA decode kernel takes kv_lora_rank 512 +
        # qk_rope_head_dim 64 only.
        kv_lora_rank=512,
        q_lora_rank=48,
        qk_nope_head_dim=32,
        qk_rope_head_dim=64,
        v_head_dim=64,
        rope_scaling=None,
        max_position_embeddings=c["max_position_embeddings"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    return DeepseekV3ForCausalLM(config)


def _qwen2(vocab: int) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, num_key_value_heads=1, use_sliding_window=False, **_common()))


def _gemma(vocab: int) -> Any:
    from transformers import GemmaConfig, GemmaForCausalLM

    # Gemma's default head_dim is 256; vLLM's CPU attention wants 64 here (hidden 64, one head).
    return GemmaForCausalLM(
        GemmaConfig(vocab_size=vocab, num_key_value_heads=1, head_dim=64, hidden_act="gelu_pytorch_tanh", **_common())
    )


def _gemma2(vocab: int) -> Any:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Gemma2: norms after attention and MLP as well as before, logit soft-capping; alternating
    # sliding-window layers (the window longer than any test prompt). head_dim 64, as for Gemma.
    return Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=vocab,
            num_key_value_heads=1,
            head_dim=64,
            query_pre_attn_scalar=64,
            sliding_window=128,
            hidden_activation="gelu_pytorch_tanh",
            final_logit_softcapping=30.0,
            **{**_common(), "tie_word_embeddings": True},  # vLLM's Gemma2 has no lm_head of its own
        )
    )


def _mixtral(vocab: int) -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(
        MixtralConfig(vocab_size=vocab, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, **_common())
    )


FAMILIES: dict[str, Callable[[int], Any]] = {
    "llama-split": _llama,
    "stablelm": _stablelm,
    "opt": _opt,
    "gpt-neox": _gpt_neox,
    "phi": _phi,
    "gpt-j": _gpt_j,
    "falcon": _falcon,
    # Two heads of 64 (the one key/value head copied to both ranks): Falcon cut in two by TP.
    "falcon-split": lambda vocab: _falcon(vocab, hidden=128, heads=2),
    "mistral": _mistral,
    "qwen3": _qwen3,
    "deepseek-v3": _deepseek_v3,
    "mixtral": _mixtral,
    "qwen2": _qwen2,
    "gemma": _gemma,
    "gemma2": _gemma2,
}


def _randomised(make: Callable[[int], Any]) -> Callable[[int], Any]:
    """``make`` with norm weights around 1 and biases around 0 drawn at random (seeded by the caller)."""

    def build(vocab: int) -> Any:
        import torch

        model = make(vocab)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.1)
                elif param.ndim == 1:  # a norm's scale
                    param.normal_(1.0, 0.2)
        return model

    return build


def build_tiny_family(family: str, seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) ``tiny-<family>`` under the models folder and return its path."""
    name = f"tiny-{family}"
    path = models_dir() / name
    if not force and (path / "tpmflow-card.json").is_file():
        return path
    return _build_random(name, seed, True, _randomised(FAMILIES[family]), SHAPE, {"architecture": family})
