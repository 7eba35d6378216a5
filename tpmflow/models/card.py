"""Model cards: the JSON that travels with every locally built model, its content hash, and
``version_of``, the one definition of "which version is this model folder"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import blake3
from pydantic import BaseModel, Field

CARD_FILE = "tpmflow-card.json"


class ModelCard(BaseModel):
    """What a model is, how it was made, and how good it is.

    ``content_hash`` is the model's identity in provenance records (until the model store of the
    versioning issue gives it a version id).
    """

    name: str
    kind: str = Field(description="'tiny' (random weights, tests) or 'demo' (trained SMILES model)")
    architecture: str = "LlamaForCausalLM"
    content_hash: str = Field(description="blake3:<hex> over the weight files, in name order")
    parameters: int
    config: dict[str, Any] = Field(default_factory=dict, description="hidden size, layers, heads, vocab")
    seed: int
    created: str
    tpmflow_version: str
    training: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None

    def write(self, model_dir: Path) -> None:
        """Write the card next to the weights."""
        (model_dir / CARD_FILE).write_text(self.model_dump_json(indent=2) + "\n")


def read_card(model_dir: Path) -> ModelCard:
    """Read a model's card; raises ``FileNotFoundError`` when the folder holds none."""
    return ModelCard.model_validate(json.loads((model_dir / CARD_FILE).read_text()))


def content_hash(model_dir: Path) -> str:
    """blake3 over every ``*.safetensors`` file of a model folder, names included, in sorted order.

    Names are hashed too, so renaming a shard changes the identity; the hash streams each file so
    a multi-GB shard never sits in memory.
    """
    hasher = blake3.blake3()
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weight files in {model_dir}")
    for path in files:
        hasher.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                hasher.update(chunk)
    return "blake3:" + hasher.hexdigest()


def card_version(model_dir: Path) -> str | None:
    """The version id the folder's card names, if it has a readable one (no hashing: cheap)."""
    try:
        value = json.loads((model_dir / CARD_FILE).read_text())["content_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def version_of(model_dir: Path) -> str:
    """The version id (content hash) of a model folder: the one its card names, else computed.

    The model store writes a card that names the checkout's own hash (a stale one is restamped at
    commit), and a built model's card is written from its weights, so the card is trusted and a
    multi-GB folder is not re-hashed at every start. Raises ``FileNotFoundError`` when the folder
    has neither a card nor weight files.
    """
    return card_version(model_dir) or content_hash(model_dir)
