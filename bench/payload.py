"""A 64 MB array delivered to a replica inline (base64 in the JSON body) vs by reference
(ProxyStore file store + signed reference), side by side in one run (prints one JSON line).

Both paths end with the replica decoding the array and returning its blake3 digest, so both do
the same work at the receiving end.
"""

from __future__ import annotations

import json
import time

import numpy as np


def main() -> None:
    from tpmflow.config import GatewayConfig, PoolConfig
    from tpmflow.models.catalog import model_path
    from tpmflow.pool import Pool

    array = np.random.default_rng(0).random(64 * 2**20 // 4, dtype=np.float32)  # 64 MiB
    cfg = PoolConfig(
        model=str(model_path("tiny-llama")),
        replicas=1,
        gateway=GatewayConfig(max_body_bytes=512 << 20, request_timeout_s=600),
    )
    cfg.engine.max_model_len = 256
    with Pool(cfg) as pool, pool.client(timeout=600) as client:
        client.digest(np.zeros(4, np.float32))  # warm-up: store info, connections
        timings: dict[str, list[float]] = {"inline": [], "reference": []}
        for _ in range(3):
            t0 = time.perf_counter()
            inline = client.digest(array)
            timings["inline"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            by_ref = client.digest(client.put(array))
            timings["reference"].append(time.perf_counter() - t0)
            assert inline["digest"] == by_ref["digest"]
    best = {k: min(v) for k, v in timings.items()}
    print(
        json.dumps(
            {
                "bench": "payload",
                "mbytes": array.nbytes / 2**20,
                "seconds_inline": round(best["inline"], 3),
                "seconds_reference": round(best["reference"], 3),
                "ratio_inline_over_reference": round(best["inline"] / best["reference"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
