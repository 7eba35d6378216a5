"""Principals, tokens, permissions, service classes and the request ledger (SQLAlchemy).

SQLite in WAL mode under ``$TPMFLOW_HOME`` by default (never on NFS or Lustre); a facility points
``database_url`` at PostgreSQL.
"""

from tpmflow.access.db import AccessDB, default_database_url
from tpmflow.access.ledger import LedgerRow, LedgerWriter
from tpmflow.access.principals import PERMISSIONS, Principal

__all__ = ["PERMISSIONS", "AccessDB", "LedgerRow", "LedgerWriter", "Principal", "default_database_url"]
