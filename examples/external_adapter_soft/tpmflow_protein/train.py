"""Train and save a first part (encoder + projector), the steps of docs/adapters.md as a script:

    python -m tpmflow_protein.train --config configs/local.yaml        # the pool's model and parts folder
    python -m tpmflow_protein.train --model-dir DIR --parts DIR         # or name both yourself

It prints the part's ``name@version``; serve it with ``adapter_config={"part": "name@version"}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tpmflow.adapters import ItemError
from tpmflow_protein.adapter import ProteinAdapter
from tpmflow_protein.data import make_sequences


def train_part(
    model_dir: Path, name: str, version: str, base_model: str, steps: int = 200, n_train: int = 256, seed: int = 0
) -> str:
    """Train on ``n_train`` synthetic sequences through a frozen copy of the model in ``model_dir``
    and save the part in this process's parts folder; returns its ``name@version``."""
    from tpmflow.adapters.training import FrozenCore, save_projector, train_soft_tokens
    from tpmflow.models.card import version_of

    adapter = ProteinAdapter()
    sequences, gravy = make_sequences(n_train, seed)
    prepared = adapter.prepare(sequences)
    refused = [p for p in prepared if isinstance(p, ItemError)]
    if refused:
        raise ValueError(f"a training item was refused: {refused[0]}")
    core = FrozenCore.load(model_dir)  # the same weights the pool serves, every one frozen
    model, report = train_soft_tokens(adapter, core, np.stack(prepared), gravy, "regression", steps=steps)
    return save_projector(
        adapter,
        model,
        name,
        version,
        base_model=base_model,  # a name for people
        base_content_hash=version_of(model_dir),  # what replicas check: the weights' content hash
        hidden_size=core.hidden_size,
        training_data={"source": "synthetic sequences (tpmflow_protein.data)", "n": n_train, "seed": seed},
        metrics={"train_loss": report.final_loss},  # add held-out metrics once you have them (update_metrics)
    )


def main() -> None:
    from tpmflow.adapters.parts import pool_parts_dir, use_parts_dir
    from tpmflow.paths import parts_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="pool config YAML: train against its model, save in its parts folder")
    parser.add_argument("--model-dir", type=Path, help="model folder (instead of --config)")
    parser.add_argument("--parts", type=Path, help="parts folder (instead of --config; default $TPMFLOW_PARTS)")
    parser.add_argument("--name", default="hydropathy")
    parser.add_argument("--version", default="0.1.0")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--n-train", type=int, default=256)
    args = parser.parse_args()
    if args.config:
        from tpmflow.config import PoolConfig
        from tpmflow.versioning.checkout import replica_model_dir

        cfg = PoolConfig.from_yaml(args.config)
        model_dir, parts, base_model = replica_model_dir(cfg), pool_parts_dir(cfg), cfg.served_model_name or cfg.model
    elif args.model_dir:
        model_dir, base_model = args.model_dir, args.model_dir.name
        parts = args.parts or parts_dir()
    else:
        parser.error("give --config, or --model-dir (and --parts)")
    with use_parts_dir(parts):  # save where the pool reads parts
        print(train_part(model_dir, args.name, args.version, base_model, steps=args.steps, n_train=args.n_train))


if __name__ == "__main__":
    main()
