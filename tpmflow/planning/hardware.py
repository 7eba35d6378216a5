"""The accelerators a replica can be planned on: memory and memory bandwidth of one device (the
unit vLLM gives one rank), and how many devices a node has.

Memory is what the device reports as usable (``torch.cuda.get_device_properties(i).total_memory``
and its XPU/ROCm equivalents), a little under the datasheet's figure; bandwidth is the datasheet's
peak, which the roofline scales by a measured or documented efficiency (:mod:`.roofline`).
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict


class Accelerator(BaseModel):
    """One kind of device, as vLLM sees it: one rank per device."""

    model_config = ConfigDict(frozen=True)

    name: str
    memory_gib: float
    bandwidth_gb_s: float  # peak, 10^9 bytes/s
    per_node: int
    kind: Literal["gpu", "cpu"] = "gpu"
    # Per rank, outside weights, KV cache and activations: driver context, collective-communication
    # buffers, captured graphs (CUDA graphs are ~0.5 GiB on a large model; NCCL/oneCCL buffers similar).
    runtime_gib: float = 1.0
    note: str = ""


# fmt: off
ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    # NVIDIA A100 datasheet: 40 GB HBM2, 1,555 GB/s. ALCF Polaris: 4 per node.
    Accelerator(name="a100-40gb", memory_gib=39.4, bandwidth_gb_s=1555, per_node=4,
                note="NVIDIA A100 40GB; a Polaris node has 4"),
    # NVIDIA A100 datasheet: 80 GB HBM2e, 2,039 GB/s (SXM). DGX/HGX A100: 8 per node.
    Accelerator(name="a100-80gb", memory_gib=79.2, bandwidth_gb_s=2039, per_node=8,
                note="NVIDIA A100 80GB SXM, 8 per HGX node"),
    # NVIDIA H100 datasheet: 80 GB HBM3, 3.35 TB/s (SXM5). DGX/HGX H100: 8 per node.
    Accelerator(name="h100-80gb", memory_gib=79.1, bandwidth_gb_s=3350, per_node=8,
                note="NVIDIA H100 80GB SXM, 8 per HGX node"),
    # NVIDIA H200 datasheet: 141 GB HBM3e, 4.8 TB/s. HGX H200: 8 per node.
    Accelerator(name="h200-141gb", memory_gib=139.8, bandwidth_gb_s=4800, per_node=8,
                note="NVIDIA H200 141GB SXM, 8 per HGX node"),
    # Intel Data Center GPU Max 1550: 128 GB HBM2e and 3.2768 TB/s over its 2 tiles (stacks); vLLM on
    # Aurora runs one rank per tile (ZE_FLAT_DEVICE_HIERARCHY=FLAT). ALCF Aurora: 6 GPUs = 12 tiles per node.
    Accelerator(name="max1550-tile", memory_gib=64, bandwidth_gb_s=1638, per_node=12,
                note="one tile of an Intel Max 1550; an Aurora node has 12"),
    # AMD MI250X: 128 GB HBM2e and 3.2768 TB/s over its 2 GCDs, one rank each. OLCF Frontier: 4 MI250X = 8 GCDs.
    Accelerator(name="mi250x-gcd", memory_gib=64, bandwidth_gb_s=1638, per_node=8,
                note="one GCD of an AMD MI250X; a Frontier node has 8"),
    # A dual-socket Xeon 8480+ (Sapphire Rapids) node: 8 channels of DDR5-4800 a socket = 2 x 307 GB/s;
    # 512 GiB. vLLM's CPU build runs one rank per node here (its TP over sockets is left out).
    Accelerator(name="cpu-node", memory_gib=512, bandwidth_gb_s=614, per_node=1, kind="cpu", runtime_gib=2.0,
                note="2-socket Xeon 8480+ node, DDR5-4800"),
)}
# fmt: on

ALIASES = {
    "polaris": "a100-40gb",
    "aurora": "max1550-tile",
    "frontier": "mi250x-gcd",
    "a100": "a100-40gb",
    "h100": "h100-80gb",
    "h200": "h200-141gb",
    "max1550": "max1550-tile",
    "mi250x": "mi250x-gcd",
    "cpu": "cpu-node",
}
LOCAL = "local"


def known_names() -> list[str]:
    return [*ACCELERATORS, *ALIASES, LOCAL]


def lookup(name: str) -> Accelerator:
    """The accelerator of a name or alias (``polaris``, ``aurora``, ``h100`` ...), or ``local``: this
    machine as one CPU node, its bandwidth as ``bench/plan_calibration.py`` measured it.

    Raises:
        ValueError: listing the known names.
    """
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key == LOCAL:
        return local_cpu()
    if key not in ACCELERATORS:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(known_names())}")
    return ACCELERATORS[key]


def local_cpu() -> Accelerator:
    """This machine as a CPU node: its RAM, and the bandwidth the calibration measured here."""
    from tpmflow.planning.roofline import load_calibration

    calibration = load_calibration().get("cpu")
    if not calibration or not calibration.get("bandwidth_gb_s"):
        raise ValueError("hardware 'local' needs this machine's measured bandwidth: run bench/plan_calibration.py")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return Accelerator(
        name=LOCAL,
        memory_gib=round(memory, 1),
        bandwidth_gb_s=float(calibration["bandwidth_gb_s"]),
        per_node=1,
        kind="cpu",
        runtime_gib=2.0,
        note=f"this machine, bandwidth measured {calibration.get('date', '?')}",
    )
