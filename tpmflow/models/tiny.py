"""``tpmflow models build-tiny``: a random-weight Llama for tests, built in seconds."""

from __future__ import annotations

from pathlib import Path

from tpmflow import __version__
from tpmflow.models.build_common import build_atomically, llama_config, utc_now
from tpmflow.models.card import ModelCard, content_hash
from tpmflow.models.catalog import TINY_GPT2_MODEL, TINY_MODEL
from tpmflow.models.char_tokenizer import PRINTABLE_ASCII, SPECIAL_TOKENS, build_char_tokenizer

TINY_SHAPE = {"hidden": 128, "layers": 2, "heads": 2, "intermediate": 256, "max_positions": 1024}


def build_tiny(name: str = TINY_MODEL, seed: int = 0, force: bool = False) -> Path:
    """Build the tiny model (printable-ASCII characters as tokens) and return its folder."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    def write(out: Path) -> None:
        vocab_size = len(SPECIAL_TOKENS) + len(PRINTABLE_ASCII)
        config = llama_config(vocab_size=vocab_size, **TINY_SHAPE)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
        model.save_pretrained(str(out), safe_serialization=True)
        GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(str(out))
        build_char_tokenizer(PRINTABLE_ASCII, out, model_max_length=TINY_SHAPE["max_positions"])
        ModelCard(
            name=name,
            kind="tiny",
            content_hash=content_hash(out),
            parameters=sum(p.numel() for p in model.parameters()),
            config={"vocab_size": vocab_size, **TINY_SHAPE, "head_dim": 64, "dtype": "float32"},
            seed=seed,
            created=utc_now(),
            tpmflow_version=__version__,
        ).write(out)

    return build_atomically(name, write, force)


TINY_GPT2_SHAPE = {"hidden": 128, "layers": 2, "heads": 2, "max_positions": 1024}


def build_tiny_gpt2(name: str = TINY_GPT2_MODEL, seed: int = 0, force: bool = False) -> Path:
    """A random-weight GPT-2 (LayerNorm, learned positions, unfused residual) with the same
    character tokenizer: the second architecture the probe hooks are tested on."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    def write(out: Path) -> None:
        vocab_size = len(SPECIAL_TOKENS) + len(PRINTABLE_ASCII)
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
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).to(torch.float32)
        model.save_pretrained(str(out), safe_serialization=True)
        GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(str(out))
        build_char_tokenizer(PRINTABLE_ASCII, out, model_max_length=s["max_positions"])
        ModelCard(
            name=name,
            kind="tiny",
            content_hash=content_hash(out),
            parameters=sum(p.numel() for p in model.parameters()),
            config={"vocab_size": vocab_size, **s, "head_dim": 64, "dtype": "float32", "architecture": "gpt2"},
            seed=seed,
            created=utc_now(),
            tpmflow_version=__version__,
        ).write(out)

    return build_atomically(name, write, force)
