"""Make ``capstan`` importable from the source tree when the package is not installed."""

import sys
from pathlib import Path

_OPERATOR = Path(__file__).resolve().parents[2] / "operator"
if str(_OPERATOR) not in sys.path:
    sys.path.insert(0, str(_OPERATOR))
