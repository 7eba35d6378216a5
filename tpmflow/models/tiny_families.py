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


def _qwen2(vocab: int) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, num_key_value_heads=1, use_sliding_window=False, **_common()))


def _gemma(vocab: int) -> Any:
    from transformers import GemmaConfig, GemmaForCausalLM

    # Gemma's default head_dim is 256; vLLM's CPU attention wants 64 here (hidden 64, one head).
    return GemmaForCausalLM(
        GemmaConfig(vocab_size=vocab, num_key_value_heads=1, head_dim=64, hidden_act="gelu_pytorch_tanh", **_common())
    )


def _mixtral(vocab: int) -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(
        MixtralConfig(vocab_size=vocab, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, **_common())
    )


FAMILIES: dict[str, Callable[[int], Any]] = {
    "stablelm": _stablelm,
    "opt": _opt,
    "gpt-neox": _gpt_neox,
    "mixtral": _mixtral,
    "qwen2": _qwen2,
    "gemma": _gemma,
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
