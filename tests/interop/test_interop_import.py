"""moeplat.interop imports transformers only when a block is built (to_hf): from_hf reads attributes."""

from __future__ import annotations

import subprocess
import sys


def test_importing_interop_does_not_import_transformers() -> None:
    code = "import sys, moeplat.interop; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
