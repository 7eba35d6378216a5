"""A soft-token tpmflow adapter for protein sequences, small enough to copy.

Sequences (one-letter amino-acid codes) become a one-hot array, a 1-D convolutional encoder turns
each into K=8 feature vectors, and tpmflow's projector maps those to the core model's hidden size:
vLLM receives them as ``prompt_embeds``. Found by tpmflow through its entry point; see README.md
and docs/adapters.md.
"""

from tpmflow_protein.adapter import ProteinAdapter, ProteinSettings

__all__ = ["ProteinAdapter", "ProteinSettings"]
