"""Service units per hour of a planned pool, priced by the pool's own cost model
(``tpmflow.access.costs.CostModel``), so the plan's figure is what the ledger would charge."""

from __future__ import annotations

from pydantic import BaseModel

from tpmflow.access.costs import CostModel

HOUR_S = 3600


class HourlyCost(BaseModel):
    """One hour at the planned load: the counters the ledger would sum, and their SUs."""

    service_class: str
    su_per_hour: float
    su_by_counter: dict[str, float]
    output_tokens: float
    prompt_tokens: float
    activation_bytes: float
    engine_seconds: float  # each request is charged from forwarding to answer: requests in flight x 3600


def hourly_cost(
    costs: CostModel,
    service_class: str,
    *,
    output_tokens_per_s: float,
    prompt_tokens_per_s: float,
    activation_bytes_per_s: float,
    in_flight: int,
) -> HourlyCost:
    """SUs of an hour of this load in ``service_class`` (its multiplier applied)."""
    counters = {
        "output_tokens": round(output_tokens_per_s * HOUR_S),
        "prompt_tokens": round(prompt_tokens_per_s * HOUR_S),
        "activation_bytes": round(activation_bytes_per_s * HOUR_S),
    }
    engine_ms = float(in_flight * HOUR_S * 1000)
    parts = {name: costs.charge(service_class, **{name: value}) for name, value in counters.items()}
    parts["engine_seconds"] = costs.charge(service_class, engine_ms=engine_ms)
    return HourlyCost(
        service_class=service_class,
        su_per_hour=costs.charge(service_class, **counters, engine_ms=engine_ms),
        su_by_counter=parts,
        output_tokens=counters["output_tokens"],
        prompt_tokens=counters["prompt_tokens"],
        activation_bytes=counters["activation_bytes"],
        engine_seconds=engine_ms / 1000,
    )
