"""The local model cache: which models are built and where."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from tpmflow.errors import ModelNotFound
from tpmflow.models.card import CARD_FILE, ModelCard, read_card
from tpmflow.paths import legacy_checkouts_dir, models_dir

TINY_MODEL = "tiny-llama"
TINY_GPT2_MODEL = "tiny-gpt2"
DEMO_MODEL = "smiles-llama"


def model_path(name: str) -> Path:
    """Folder of a built model; raises ``ModelNotFound`` with the command that builds it."""
    path = models_dir() / name
    if not (path / CARD_FILE).is_file():
        hint = {TINY_MODEL: "tpmflow models build-tiny", DEMO_MODEL: "tpmflow models build-demo"}
        how = hint.get(name, "tpmflow models list")
        raise ModelNotFound(f"model {name!r} is not built under {models_dir()}; run `{how}`")
    return path


def list_models() -> list[tuple[Path, ModelCard | None]]:
    """Every model folder in the cache with its card (``None`` when the card is missing or broken).

    Hidden folders (builds in progress) and version checkouts an earlier tpmflow left in
    ``models/versions`` are not models, so they are not listed.
    """
    root = models_dir()
    if not root.is_dir():
        return []
    legacy = legacy_checkouts_dir()
    found: list[tuple[Path, ModelCard | None]] = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if path == legacy and not (path / CARD_FILE).is_file():
            continue
        try:
            found.append((path, read_card(path)))
        except (FileNotFoundError, ValidationError, ValueError):
            found.append((path, None))
    return found
