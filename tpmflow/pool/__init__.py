"""The TPM pool: vLLM replicas behind a gateway."""

from tpmflow.pool.pool import Pool

__all__ = ["Pool"]
