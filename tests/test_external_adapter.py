"""A newcomer's adapter package is installed and found through its entry point, tpmflow untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
from tpmflow.adapters import available_adapters, load_adapter
from tpmflow.adapters.testing import check_adapter
assert "uppercase" in available_adapters(), available_adapters()
adapter = load_adapter("uppercase")
check_adapter(adapter, good=["hello", "tpm flow"], bad=["", "x" * 500, 3])
print("OK", adapter.encode(["hi"])[0].text)
"""


def test_external_adapter_package_is_found_and_conforms(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT / "examples" / "external_adapter"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "OK HI"
