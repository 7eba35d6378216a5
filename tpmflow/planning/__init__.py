"""Capacity planning for serving a large model: the replica shape that holds it, how many replicas
a target needs, their decode throughput from memory bandwidth, probe traffic and SU cost.
``tpmflow plan`` is the command; :func:`plan` the function behind it."""

from tpmflow.planning.command import PlanRequest, run
from tpmflow.planning.hardware import ACCELERATORS, Accelerator, lookup
from tpmflow.planning.model import ModelSpec
from tpmflow.planning.planner import Workload, plan
from tpmflow.planning.probe import ProbeTraffic
from tpmflow.planning.report import Plan, render
from tpmflow.planning.shape import EngineSettings, fit

__all__ = [
    "ACCELERATORS",
    "Accelerator",
    "EngineSettings",
    "ModelSpec",
    "Plan",
    "PlanRequest",
    "ProbeTraffic",
    "Workload",
    "fit",
    "lookup",
    "plan",
    "render",
    "run",
]
