"""Make the planner simulator (sim.py) importable from the serving tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
