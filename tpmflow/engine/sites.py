"""The one table of hook sites: what a probe may capture or edit, and where in a decoder block it is.

Names follow TransformerLens (``blocks.{L}.hook_resid_post``), so interpretability researchers
feel at home. The wire schema (which the client imports), the replica's probe route and the
worker hooks all read this table, so it imports nothing heavy: no torch, no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Which part of decoder block L a site is read at (``DecoderLayout.part`` finds it in vLLM's tree):
# the block itself (its input or output), its attention, its MLP, or the attention's output projection.
Part = Literal["block_in", "block_out", "attn", "mlp", "out_proj_in"]


@dataclass(frozen=True)
class Site:
    """One hook site of a decoder block."""

    name: str
    part: Part
    doc: str
    stream: bool = False  # the residual stream (vLLM's fused layers keep it as hidden + residual)
    editable: bool = True  # interventions (add, replace, zero) may write it
    per_head: bool = False  # [heads, head_dim] per position, not [hidden]
    edit_instead: str = ""  # for a site that cannot be edited: the one to edit instead

    @property
    def alias(self) -> str:
        """The short name clients may use (``resid_post`` for ``hook_resid_post``)."""
        return self.name.removeprefix("hook_")


RESID_PRE = "hook_resid_pre"
RESID_POST = "hook_resid_post"
ATTN_OUT = "hook_attn_out"
MLP_OUT = "hook_mlp_out"
Z = "hook_z"

SITES: dict[str, Site] = {
    s.name: s
    for s in (
        Site(RESID_PRE, "block_in", "the residual stream entering the block (the embeddings for block 0)", stream=True),
        Site(RESID_POST, "block_out", "the residual stream leaving the block", stream=True),
        Site(ATTN_OUT, "attn", "the attention output (after the output projection)"),
        Site(MLP_OUT, "mlp", "the MLP output"),
        Site(
            Z,
            "out_proj_in",
            "the attention output per head, before the output projection",
            editable=False,
            per_head=True,
            edit_instead=ATTN_OUT,
        ),
    )
}
SITE_NAMES: tuple[str, ...] = tuple(SITES)
LENS_SITE = RESID_POST  # the logit lens unembeds the stream leaving each block

_BY_ALIAS = {s.alias: s.name for s in SITES.values()}


def split_site(site: str) -> tuple[str, int | None]:
    """``blocks.3.hook_resid_post`` -> (``hook_resid_post``, 3); ``resid_post`` -> (``hook_resid_post``, None).

    Raises:
        ValueError: not ``[blocks.L.]<site>`` with a site of the table (or its short alias).
    """
    layer: int | None = None
    name = site
    if site.startswith("blocks."):
        _, number, name = (site.split(".", 2) + ["", ""])[:3]
        if not number.isdigit():
            raise ValueError(f"bad site {site!r}: expected blocks.<layer>.<hook>")
        layer = int(number)
    name = _BY_ALIAS.get(name, name)
    if name not in SITES:
        raise ValueError(f"unknown site {site!r}; sites are {sorted(SITES)} (optionally blocks.L.)")
    return name, layer
