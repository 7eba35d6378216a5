"""Every folder tpmflow keeps under ``$TPMFLOW_HOME``, and the environment variables that move them.

One function per folder, read from the environment at each call (tests and replicas set the
variables after import). Imports nothing from tpmflow, so any module may use it without an import
cycle. Layout, with the defaults::

    $TPMFLOW_HOME (~/.cache/tpmflow)
      models/<name>/       locally built models (tpmflow models build-tiny | build-demo)
      checkouts/<hex>/     model-store versions checked out as folders vLLM loads
      checkouts/lora-<hex>/  LoRA versions exported as PEFT folders
      store/               the payload store's file connector, one folder per principal
      store/models/        the model store ($TPMFLOW_MODEL_STORE)
      parts/               trained adapter parts ($TPMFLOW_PARTS)
      logs/pool-<port>/    replica logs of a pool
      access.db            the access database (SQLite) when no database_url is configured
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The root of tpmflow's files: ``$TPMFLOW_HOME`` or ``~/.cache/tpmflow``."""
    env = os.environ.get("TPMFLOW_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tpmflow"


def models_dir() -> Path:
    """Locally built models, one folder each (``tpmflow models list`` lists these)."""
    return home() / "models"


def checkouts_dir() -> Path:
    """Model-store versions checked out as model folders, one per version id.

    Kept apart from ``models_dir()`` so a checkout is never mistaken for a built model."""
    return home() / "checkouts"


def legacy_checkouts_dir() -> Path:
    """Where earlier tpmflow releases checked versions out (inside ``models_dir()``); read only to
    move those checkouts to ``checkouts_dir()``."""
    return models_dir() / "versions"


def payload_store_dir() -> Path:
    """The payload store's default root (file connector), one folder per principal."""
    return home() / "store"


def model_store_dir() -> Path:
    """The model store: ``$TPMFLOW_MODEL_STORE``, else ``$TPMFLOW_HOME/store/models``."""
    env = os.environ.get("TPMFLOW_MODEL_STORE")
    return Path(env).expanduser() if env else payload_store_dir() / "models"


def parts_dir() -> Path:
    """Trained adapter parts: ``$TPMFLOW_PARTS`` (a pool's ``parts_path``), else ``$TPMFLOW_HOME/parts``."""
    env = os.environ.get("TPMFLOW_PARTS")
    return Path(env) if env else home() / "parts"


def logs_dir() -> Path:
    """Logs of pools' replicas, one folder per pool."""
    return home() / "logs"


def pool_logs_dir(port: int) -> Path:
    """The replica logs of the pool whose gateway listens on ``port``."""
    return logs_dir() / f"pool-{port}"


def knowledge_dir(database_url: str) -> Path:
    """The knowledge store's index files of the pool whose database is ``database_url`` (each
    database's collections apart: their ids are the database's)."""
    import hashlib

    return home() / "knowledge" / hashlib.sha256(database_url.encode()).hexdigest()[:16]


def access_db_path() -> Path:
    """The SQLite access database used when a pool names no ``database_url``."""
    return home() / "access.db"
