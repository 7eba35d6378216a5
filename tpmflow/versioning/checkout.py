"""What a pool's replicas load: each replica's model folder and LoRA adapters, checked out of the
model store when the pool config names versions, and checked before any replica starts.

Kept out of ``tpmflow.config`` (pure schema) so that the config does not import the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tpmflow.errors import InvalidRequest
from tpmflow.models.card import version_of
from tpmflow.models.catalog import model_path
from tpmflow.versioning.cache import LoraCheckout, materialise, materialise_lora

if TYPE_CHECKING:
    from tpmflow.config import PoolConfig


def replica_model_dir(cfg: PoolConfig, replica: int = 0) -> Path:
    """The folder replica (slot index) ``replica`` loads: a model-store version's checkout, or ``cfg.model``
    (a folder, else a model built in the local cache)."""
    per_replica = cfg.replica_versions or []
    version = per_replica[replica] if replica < len(per_replica) else cfg.version
    if version is not None:
        return materialise(version, cfg.model_store)
    path = Path(cfg.model).expanduser()
    if path.is_dir():
        return path
    return model_path(cfg.model)


def replica_loras(cfg: PoolConfig, replica: int = 0) -> list[LoraCheckout]:
    """The ``lora_versions`` replica ``replica`` serves as adapters: those whose parent it runs."""
    if not cfg.lora_versions:
        return []
    runs = version_of(replica_model_dir(cfg, replica))
    return [lora for name in cfg.lora_versions if (lora := materialise_lora(name, cfg.model_store)).parent == runs]


def check_loras(cfg: PoolConfig) -> None:
    """Every LoRA version must have a replica running its parent (fail at start, not per request)."""
    runs = {version_of(replica_model_dir(cfg, s.index)) for s in cfg.slots()}
    for name in cfg.lora_versions or []:
        lora = materialise_lora(name, cfg.model_store)
        if lora.parent not in runs:
            raise InvalidRequest(
                f"LoRA version {name} ({lora.version}) applies to {lora.parent}, which no replica runs "
                f"(they run {sorted(runs)}); set `version:` to its parent, or serve it merged with `version: {name}`"
            )


def check_out(cfg: PoolConfig) -> None:
    """Before any replica starts: find every slot's model (``ModelNotFound`` names the build command),
    check stored versions out once, and check the LoRA versions."""
    for slot in cfg.slots():
        replica_model_dir(cfg, slot.index)
    check_loras(cfg)
