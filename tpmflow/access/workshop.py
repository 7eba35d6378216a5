"""Workshop mode: an instructor opens a workshop in one step — N participant principals in a
project of their own, one service class (its rate limits hold for the whole class), an allocation
shared by the project with an equal cap per participant (one participant cannot spend the
others' share), and a token each. The CLI (``tpmflow workshop open``) and the workbench's
workshop page call this same function."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from tpmflow.access.db import AccessDB
from tpmflow.errors import InvalidRequest

MAX_PARTICIPANTS = 500
MAX_SU = 1e9
_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")
DEFAULT_PERMISSIONS = frozenset({"generate", "embed", "probe"})


@dataclass(frozen=True)
class Participant:
    principal: str
    token: str


def open_workshop(
    access: AccessDB,
    name: str,
    participants: int,
    service_class: str,
    su: float,
    permissions: frozenset[str] = DEFAULT_PERMISSIONS,
    known_classes: set[str] | None = None,
) -> list[Participant]:
    """Principals ``NAME-01`` … in project ``NAME``, class ``service_class``, an allocation of
    ``su`` with a cap of ``su / participants`` each, and a fresh token per participant (shown once).
    Refused before anything is written when the name, count, SUs or class are wrong, or when the
    workshop's project already has principals (open a workshop under a new name instead)."""
    name = name.strip()
    if not _NAME.fullmatch(name):
        raise InvalidRequest("a workshop name is 1-40 ASCII letters, digits, '-' or '_'")
    if not 1 <= participants <= MAX_PARTICIPANTS:
        raise InvalidRequest(f"a workshop has 1 to {MAX_PARTICIPANTS} participants, not {participants}")
    if not (math.isfinite(su) and 0 < su <= MAX_SU):
        raise InvalidRequest(f"a workshop's allocation grants a positive number of SU, at most {MAX_SU:g}")
    if known_classes is not None and service_class not in known_classes:
        raise InvalidRequest(f"service class {service_class!r} is not in the pool config ({', '.join(sorted(known_classes))})")
    width = len(str(participants))
    names = [f"{name}-{i:0{max(2, width)}d}" for i in range(1, participants + 1)]
    existing = access.principals()
    if any(p.project == name for p in existing):
        raise InvalidRequest(f"project {name!r} already has principals: open the workshop under a new name")
    taken = sorted({p.name for p in existing} & set(names))
    if taken:  # never take an existing principal over (its project, permissions, class)
        raise InvalidRequest(f"principals {', '.join(taken[:3])} already exist: open the workshop under a new name")
    access.allocations.create(name, su, caps={n: su / participants for n in names})
    out = []
    for principal in names:
        access.ensure_principal(principal, name, set(permissions), service_class)
        out.append(Participant(principal, access.create_token(principal)))
    return out
