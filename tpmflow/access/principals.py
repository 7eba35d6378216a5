"""Principals: who is asking, what they may do (permissions), how they are scheduled (service class)."""

from __future__ import annotations

from dataclasses import dataclass

PERMISSIONS = frozenset({"generate", "embed", "probe", "admin"})


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``permissions`` and ``service_class`` are independent on purpose."""

    name: str
    project: str
    permissions: frozenset[str]
    service_class: str
    cache_salt: str

    def can(self, permission: str) -> bool:
        return permission in self.permissions or "admin" in self.permissions
