"""Locally built models: a random tiny Llama for tests and a trained SMILES model for the demo.

No weights are downloaded: HPC compute nodes and CI often have no internet. Each model is a
Hugging Face folder (safetensors + config + tokenizer) with a ``tpmflow-card.json`` whose
``content_hash`` (blake3 over the weight files) identifies it in provenance records.
"""

from tpmflow.models.card import ModelCard, content_hash, read_card
from tpmflow.models.catalog import list_models, model_path

__all__ = ["ModelCard", "content_hash", "list_models", "model_path", "read_card"]
