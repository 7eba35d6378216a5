"""``tpmflow models build-tiny``: a random-weight Llama for tests, built in seconds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tpmflow import __version__
from tpmflow.models.build_common import build_atomically, llama_config, utc_now
from tpmflow.models.card import ModelCard, content_hash
from tpmflow.models.catalog import TINY_GPT2_MODEL, TINY_MODEL
from tpmflow.models.char_tokenizer import PRINTABLE_ASCII, SPECIAL_TOKENS, build_char_tokenizer

TINY_SHAPE = {"hidden": 128, "layers": 2, "heads": 2, "intermediate": 256, "max_positions": 1024}


def _build_random(
    name: str, seed: int, force: bool, make_model: Callable[[int], Any], shape: dict[str, int], extra: dict[str, str]
) -> Path:
    """Save a seeded random-weight model from ``make_model(vocab_size)``, the generation config,
    the character tokenizer and a card: what every tiny model shares."""

    def write(out: Path) -> None:
        import torch
        from transformers import GenerationConfig

        vocab_size = len(SPECIAL_TOKENS) + len(PRINTABLE_ASCII)
        torch.manual_seed(seed)
        model = make_model(vocab_size).to(torch.float32)
        model.save_pretrained(str(out), safe_serialization=True)
        GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(str(out))
        build_char_tokenizer(PRINTABLE_ASCII, out, model_max_length=shape["max_positions"])
        ModelCard(
            name=name,
            kind="tiny",
            content_hash=content_hash(out),
            parameters=sum(p.numel() for p in model.parameters()),
            config={"vocab_size": vocab_size, **shape, "head_dim": 64, "dtype": "float32", **extra},
            seed=seed,
            created=utc_now(),
            tpmflow_version=__version__,
        ).write(out)

    return build_atomically(name, write, force)


def build_tiny(name: str = TINY_MODEL, seed: int = 0, force: bool = False) -> Path:
    """Build the tiny model (printable-ASCII characters as tokens) and return its folder."""

    def make(vocab_size: int) -> Any:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(llama_config(vocab_size=vocab_size, **TINY_SHAPE))

    return _build_random(name, seed, force, make, TINY_SHAPE, {})


TINY_GPT2_SHAPE = {"hidden": 128, "layers": 2, "heads": 2, "max_positions": 1024}


def build_tiny_gpt2(name: str = TINY_GPT2_MODEL, seed: int = 0, force: bool = False) -> Path:
    """A random-weight GPT-2 (LayerNorm, learned positions, unfused residual) with the same
    character tokenizer: the second architecture the probe hooks are tested on."""

    def make(vocab_size: int) -> Any:
        from transformers import GPT2Config, GPT2LMHeadModel

        s = TINY_GPT2_SHAPE
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=s["max_positions"],
            n_embd=s["hidden"],
            n_layer=s["layers"],
            n_head=s["heads"],
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            torch_dtype="float32",
        )
        return GPT2LMHeadModel(config)

    return _build_random(name, seed, force, make, TINY_GPT2_SHAPE, {"architecture": "gpt2"})
