"""Start vLLM's offline ``LLM`` on a local model with settings that work on CPU-only machines.

Callers must run under an ``if __name__ == "__main__":`` guard: vLLM starts its engine core in a
child process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def cpu_engine_env() -> None:
    """Defaults for vLLM's CPU build (each may be overridden by the caller's environment).

    ``VLLM_CPU_KVCACHE_SPACE=1`` GiB is plenty for our small models; ``RESERVED_CPU=0`` lets the
    engine use both cores of a small machine (vLLM otherwise keeps one for its front end, 1.5x
    slower here).
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def open_offline_engine(model_dir: Path, **engine_args: Any) -> Any:
    """A ``vllm.LLM`` over ``model_dir`` in float32, eager mode (hooks need eager; CPU graphs give little)."""
    cpu_engine_env()
    from vllm import LLM

    args: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": "float32",
        "enforce_eager": True,
        "max_model_len": 256,
        "seed": 0,
    }
    args.update(engine_args)
    if args["dtype"] == "float32" and uses_mla(model_dir):
        args.setdefault("attention_backend", "CPU_MLA")
    return LLM(**args)


def uses_mla(model_dir: Path | str) -> bool:
    """DeepSeek-style multi-head latent attention: on a CPU with AMX tiles vLLM picks its AMX MLA
    backend, which takes bf16/fp16/int8 weights only and fails to load a float32 model; the
    reference CPU_MLA backend runs any dtype."""
    import json

    config = Path(model_dir) / "config.json"
    return config.exists() and bool(json.loads(config.read_text()).get("kv_lora_rank"))


def sample_texts(
    llm: Any, n: int, seed: int, temperature: float = 1.0, max_tokens: int = 128, bos_token_id: int = 1
) -> list[str]:
    """Draw ``n`` unconditional samples (prompt = just ``<s>``), one seed per sample, so reproducible."""
    from vllm import SamplingParams, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=[bos_token_id]) for _ in range(n)]
    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed + i) for i in range(n)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [out.outputs[0].text for out in outputs]
