"""A content-addressed, versioned model store: every version of a model's weights, kept lean.

Tensors are stored in chunks shared between versions, or as deltas against their parent (sparse
updates, XOR + zstd, LoRA factors), whichever is smallest. A version's id is the model's content
hash (``tpmflow.models.card.content_hash``) of the folder ``checkout`` writes, so a provenance record
names the weights whether they came from the store or straight from a model folder
(``tpmflow.models.card.version_of``). What a pool's replicas load is ``tpmflow.versioning.checkout``.
"""

from tpmflow.paths import model_store_dir
from tpmflow.versioning.cache import LoraCheckout, materialise, materialise_lora
from tpmflow.versioning.diff import TensorDiff, VersionDiff
from tpmflow.versioning.manifest import Manifest, TensorRecord, WeightFile
from tpmflow.versioning.store import GcReport, ModelStore, VerifyReport

default_store_dir = model_store_dir  # the name this package exported before tpmflow.paths

__all__ = [
    "GcReport",
    "LoraCheckout",
    "Manifest",
    "ModelStore",
    "TensorDiff",
    "TensorRecord",
    "VerifyReport",
    "VersionDiff",
    "WeightFile",
    "default_store_dir",
    "materialise",
    "materialise_lora",
]
