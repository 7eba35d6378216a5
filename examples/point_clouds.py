"""Customized embeddings with your own encoder: point-cloud files in, shape classes out.

First train the point-cloud encoder + projector and its head against the demo model (one minute):

    .venv/bin/tpmflow adapters fit pointcloud

Then: .venv/bin/python examples/point_clouds.py

The clouds are synthetic (tpmflow_pointcloud.synthetic), written as PLY / PCD / XYZ files as a
scanner would; the client sends the files' bytes by reference, the replica parses them in capped
child processes, and a bad file costs only its own item.
"""

from pathlib import Path
from tempfile import TemporaryDirectory

from tpmflow_pointcloud.synthetic import make_shapes, to_pcd_bytes, to_ply_bytes, to_xyz_bytes

import tpmflow


def main() -> None:
    clouds, labels, classes = make_shapes(6, seed=42)
    with TemporaryDirectory() as tmp:
        writers = [to_ply_bytes, to_pcd_bytes, to_xyz_bytes]
        files = []
        for i, cloud in enumerate(clouds):
            path = Path(tmp) / f"scan{i}.{['ply', 'pcd', 'xyz'][i % 3]}"
            path.write_bytes(writers[i % 3](cloud))
            files.append(path)
        broken = Path(tmp) / "broken.ply"
        broken.write_bytes(files[0].read_bytes()[:300])  # a truncated upload

        with tpmflow.Pool.from_config("configs/local.yaml") as pool, pool.client() as client:
            items = [p.read_bytes() for p in [*files, broken]]
            out = client.predict(items, adapter="pointcloud", head="shape")
            for path, value, probs in zip([*files, broken], out.values, out.probabilities, strict=True):
                truth = classes[labels[files.index(path)]] if path in files else "-"
                if probs is None:
                    print(f"{path.name:12s} error: {value}")
                else:
                    print(f"{path.name:12s} predicted {value:9s} ({probs[value]:.2f})  truth {truth}")
            print("head:", out.head["name"], out.head["version"], out.head["metrics"])


if __name__ == "__main__":
    main()
