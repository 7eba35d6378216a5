"""The soft-token route (the LLaVA / PointLLM pattern): an encoder turns each item into K feature
vectors, a projector maps them to the core model's hidden size, and vLLM receives them as
``prompt_embeds``, optionally between embedded text (``EncodedEmbeds.prefix`` / ``suffix``).

vLLM has no backward pass, so encoders and projectors are trained against a local transformers
copy of the same weights (``tpmflow.adapters.training``) and saved as an adapter part; the replica
loads the part named in the adapter's config (``{"part": "name@version"}``) and serves it.

An adapter package subclasses ``SoftTokenAdapter`` and supplies the domain half:

* ``settings_type``: a dataclass of JSON-able settings with a ``part`` field (and ``prefix`` /
  ``suffix`` text) — what ``config()`` returns and ``from_config()`` takes;
* ``prepare(items)``: parse and validate items into fixed-shape float32 encoder inputs, or an
  ``ItemError`` per bad item (hostile files parsed through ``tpmflow.adapters.sandbox``);
* ``build_encoder()``: a torch module mapping ``[B, *input_shape]`` to ``[B, K, encoder_dim]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from tpmflow.adapters.base import AdapterFit, Decoded, EncodedEmbeds, ItemError
from tpmflow.errors import InvalidRequest

if TYPE_CHECKING:
    from torch import nn

    from tpmflow.adapters.soft_model import Projector, SoftTokenModel  # noqa: F401  (typed re-exports, see __getattr__)

# torch comes only with the cpu / gpu extras: it is imported where a model is built, loaded or run,
# so a bare install (the client) can import this module. The torch modules live in soft_model.
_TORCH_NAMES = ("Projector", "SoftTokenModel")


def __getattr__(name: str) -> object:
    # ``from tpmflow.adapters.soft import SoftTokenModel`` keeps working (and imports torch then).
    if name in _TORCH_NAMES:
        from tpmflow.adapters import soft_model

        return getattr(soft_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class SoftTokenAdapter:
    """Base for adapters whose items become soft tokens. See the module docstring."""

    name: ClassVar[str]
    version: ClassVar[str]
    modality: ClassVar[str]
    settings_type: ClassVar[type]
    encoder_dim: ClassVar[int]
    batch_size: ClassVar[int] = 64  # items per encoder forward: bounds memory on big requests

    def __init__(self, settings: Any | None = None) -> None:
        self.settings = settings if settings is not None else self.settings_type()
        self.model: SoftTokenModel | None = None
        self.fit = AdapterFit()
        self.part_card: Any | None = None
        if getattr(self.settings, "part", None):
            self._load_part(self.settings.part)

    # -- to be supplied by the domain package ----------------------------------------------------

    def prepare(self, items: Sequence[Any]) -> list[np.ndarray | ItemError]:
        """Items into fixed-shape float32 encoder inputs, one result per item, in order."""
        raise NotImplementedError

    def build_encoder(self) -> nn.Module:
        """A fresh (untrained) encoder: ``[B, *input_shape]`` to ``[B, K, encoder_dim]``."""
        raise NotImplementedError

    # -- config ----------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return asdict(self.settings)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SoftTokenAdapter:
        return cls(cls.settings_type(**config))

    # -- model -----------------------------------------------------------------------------------

    def new_model(self, hidden_size: int, seed: int = 0) -> SoftTokenModel:
        """An untrained encoder + projector for a core model of ``hidden_size`` (seeded)."""
        import torch

        from tpmflow.adapters.soft_model import Projector, SoftTokenModel

        torch.manual_seed(seed)
        return SoftTokenModel(self.build_encoder(), Projector(self.encoder_dim, hidden_size))

    def _load_part(self, spec: str) -> None:
        from safetensors.torch import load_file

        from tpmflow.adapters.parts import load_part

        path, card = load_part(self.name, spec, kind="projector")
        # A part was trained with particular settings (patch counts, prompt text…): adopt them, so
        # the served encoder is the trained one whatever else the request's config said.
        self.settings = self.settings_type(**{**card.settings, "part": spec})
        model = self.new_model(card.hidden_size)
        model.load_state_dict(load_file(str(path / "weights.safetensors")))
        model.eval()
        self.model, self.part_card = model, card
        self.fit = AdapterFit(hidden_size=card.hidden_size, content_hashes=(card.base_content_hash,))

    def use_model(self, model: SoftTokenModel) -> None:
        """Serve ``model`` (e.g. just trained, or a random-projector baseline) without saving it."""
        self.model = model.eval()

    def soft_tokens(self, inputs: np.ndarray) -> np.ndarray:
        """Prepared inputs ``[B, *input_shape]`` to float32 soft tokens ``[B, K, hidden]``."""
        import torch

        assert self.model is not None
        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))).numpy()

    def encoder_features(self, inputs: np.ndarray) -> np.ndarray:
        """Prepared inputs to the encoder's pooled features ``[B, encoder_dim]`` (a baseline)."""
        import torch

        assert self.model is not None
        with torch.no_grad():
            return self.model.features(torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))).numpy()

    # -- the Adapter protocol --------------------------------------------------------------------

    def encode(self, items: Sequence[Any]) -> list[EncodedEmbeds | ItemError]:
        """Soft tokens per item; bad items get their ``ItemError`` and the rest go on."""
        if self.model is None:
            raise InvalidRequest(
                f"adapter {self.name!r} needs a trained projector: pass config={{'part': 'name@version'}} "
                "(see `tpmflow adapters list`)"
            )
        prepared = self.prepare(items)
        out: list[EncodedEmbeds | ItemError] = list(prepared)  # type: ignore[arg-type]
        good = [i for i, p in enumerate(prepared) if not isinstance(p, ItemError)]
        prefix = getattr(self.settings, "prefix", "")
        suffix = getattr(self.settings, "suffix", "")
        for start in range(0, len(good), self.batch_size):
            chunk = good[start : start + self.batch_size]
            tokens = self.soft_tokens(np.stack([prepared[i] for i in chunk]))  # type: ignore[misc]
            for i, row in zip(chunk, tokens, strict=True):
                out[i] = EncodedEmbeds(np.ascontiguousarray(row), prefix=prefix, suffix=suffix)
        return out

    def decode(self, texts: Sequence[str]) -> list[Decoded]:
        """Generated text is kept as text (a caption or label); an empty one is a reject."""
        return [Decoded(t, t.strip()) if t.strip() else Decoded(t, None, "empty output") for t in texts]


def text_around(tokenizer: Any, prefix: str, suffix: str) -> tuple[list[int], list[int]]:
    """Token ids placed before and after the soft tokens: ``prefix`` (with the tokenizer's BOS, or
    BOS alone when there is no prefix) and ``suffix`` (no special tokens). Training and serving both
    call this, so a projector is served with exactly the context it was trained in."""
    if prefix:
        before = list(tokenizer.encode(prefix))
    else:
        bos = getattr(tokenizer, "bos_token_id", None)
        before = [] if bos is None else [int(bos)]
    after = list(tokenizer.encode(suffix, add_special_tokens=False)) if suffix else []
    return before, after
