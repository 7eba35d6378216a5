"""Entry point of the ``tpmflow`` command (also ``python -m tpmflow``).

The command is the pool operator's tool (serve, tokens, allocations, usage, models, adapters); its
packages (typer, rich, SQLAlchemy, …) come with the ``pool`` extra. A bare ``pip install tpmflow``
is the client, yet pip installs the script anyway, so on such an install the command names the
extra to install instead of printing a traceback.
"""

from __future__ import annotations

import sys

POOL_EXTRA_HINT = "pip install 'tpmflow[pool]'"


def main() -> None:
    """Run the ``tpmflow`` command, or say which extra it needs."""
    try:
        from tpmflow.cli import main as cli_main
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if not missing or missing == "tpmflow":
            raise
        sys.exit(
            f"the tpmflow command needs the pool's packages ({missing} is not installed): {POOL_EXTRA_HINT} "
            "(or tpmflow[cpu] / tpmflow[gpu] for replicas too); a bare install is the client only"
        )
    cli_main()


if __name__ == "__main__":
    main()
