"""Where tpmflow keeps its files, and (later) the pydantic config models loaded from YAML."""

from __future__ import annotations

import os
from pathlib import Path


def tpmflow_home() -> Path:
    """The root of tpmflow's cache: ``$TPMFLOW_HOME`` or ``~/.cache/tpmflow``."""
    env = os.environ.get("TPMFLOW_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tpmflow"


def models_dir() -> Path:
    """Directory holding locally built models, one sub-directory each."""
    return tpmflow_home() / "models"
