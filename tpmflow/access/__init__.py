"""Principals, tokens, permissions, service classes, the request ledger, service-unit prices and
project allocations (SQLAlchemy).

SQLite in WAL mode under ``$TPMFLOW_HOME`` by default (never on NFS or Lustre); a facility points
``database_url`` at PostgreSQL.
"""

from tpmflow.access.allocations import Allocations, Reservation
from tpmflow.access.costs import CostModel
from tpmflow.access.db import AccessDB, default_database_url
from tpmflow.access.ledger import LedgerRow, LedgerWriter
from tpmflow.access.principals import PERMISSIONS, Principal

__all__ = [
    "PERMISSIONS",
    "AccessDB",
    "Allocations",
    "CostModel",
    "LedgerRow",
    "LedgerWriter",
    "Principal",
    "Reservation",
    "default_database_url",
]
