"""The deployment tests import the shared tiny models (tests/) and their own helpers (tests/flower/)."""

import sys
from pathlib import Path

for folder in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
