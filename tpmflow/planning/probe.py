"""What intermediary access adds: the activations probe requests capture, and the bandwidth the
pool's store must take. Captures are float32 (``tpmflow.engine.hooks`` casts before it writes)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from tpmflow.planning.model import ModelSpec

CAPTURE_BYTES = 4  # float32


class ProbeTraffic(BaseModel):
    """Probe requests the pool should serve."""

    layers: int = Field(ge=1, description="layers captured per request")
    sites: int = Field(1, ge=1, description="sites per layer (hook_resid_post, hook_attn_out ...)")
    positions: int = Field(ge=1, description="token positions captured per request")
    requests_per_s: float = Field(0.0, ge=0)


class ProbeLoad(BaseModel):
    bytes_per_request: int
    store_mb_s: float  # 10^6 bytes/s into the store
    problems: list[str] = Field(default_factory=list)


def probe_load(model: ModelSpec, traffic: ProbeTraffic, max_activation_bytes: int | None = None) -> ProbeLoad:
    """Bytes one request captures (layers x sites x positions x hidden x 4) and the store's load;
    ``problems`` names what a pool would refuse (more layers than the model, over its capture limit)."""
    per_request = traffic.layers * traffic.sites * traffic.positions * model.hidden * CAPTURE_BYTES
    problems = []
    if traffic.layers > model.layers:
        problems.append(f"probe captures {traffic.layers} layers; {model.name} has {model.layers}")
    if max_activation_bytes is not None and per_request > max_activation_bytes:
        problems.append(
            f"one probe captures {per_request / 2**20:.0f} MiB, over the pool's max_activation_bytes "
            f"({max_activation_bytes / 2**20:.0f} MiB): replicas refuse it"
        )
    return ProbeLoad(
        bytes_per_request=per_request, store_mb_s=per_request * traffic.requests_per_s / 1e6, problems=problems
    )
