"""The chart tests reuse the operator tests' API emulator and harness (tests/operator), and
render with the real helm binary (installed on first use by scripts/chart-tools.sh)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent / "operator"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
