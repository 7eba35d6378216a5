"""Seeded sampling through a chunked prefill on vLLM's CPU build, without killing the engine.

When a step prefills only part of a prompt, vLLM samples a token for it anyway and discards it;
for a seeded request it then rewinds the request's generator by its Philox offset
(``gen.set_offset(gen.get_offset() - 4)`` in ``GPUModelRunner._bookkeeping_sync``). CPU generators
(Mersenne Twister) have no offset: the call raises ``RuntimeError: CPU Generator does not use
offset`` in the worker and the whole engine dies. Any seeded traffic whose prompts exceed a step's
``max_num_batched_tokens`` (2048 on CPUs) triggers it: e.g. 8 seeded completions of a 300-token
prompt, or a retrieval context before seeded SMILES prompts.

The fix does the same rewind by state: each discarded request's generator state is kept before
sampling and put back after, and the generator is out of vLLM's sight while it books the step,
so it does not try the offset call. A chunked seeded request then samples exactly what it would
have sampled unchunked, as on GPUs. Installed in every vLLM process by ``hooks.register`` on the
CPU platform only.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def install() -> bool:
    """Patch ``GPUModelRunner`` (the CPU runner inherits these methods); idempotent. Returns
    whether the patch is in place."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_tpmflow_seeded_chunks", False):
        return True
    sample, bookkeeping = GPUModelRunner._sample, GPUModelRunner._bookkeeping_sync

    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        generators = self.input_batch.generators
        discarded = np.nonzero(self.discard_request_mask.np[: self.input_batch.num_reqs])[0]
        kept = {int(i): generators[int(i)].get_state() for i in discarded if int(i) in generators}
        out = sample(self, *args, **kwargs)
        for i, state in kept.items():
            generators[i].set_state(state)  # as if this step's discarded sample never happened
        self._tpmflow_rewound = list(kept)
        return out

    def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        generators = self.input_batch.generators
        rewound = getattr(self, "_tpmflow_rewound", [])
        hidden = {i: generators.pop(i) for i in rewound if i in generators}  # rewound already
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            generators.update(hidden)
            self._tpmflow_rewound = []

    GPUModelRunner._sample = _sample  # type: ignore[method-assign]
    GPUModelRunner._bookkeeping_sync = _bookkeeping_sync  # type: ignore[method-assign]
    GPUModelRunner._tpmflow_seeded_chunks = True  # type: ignore[attr-defined]
    return True
