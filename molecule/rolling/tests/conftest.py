"""The rolling tests drive the fleet from the controller with scripts/fleetload.py."""

import os
import sys
from pathlib import Path

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(PROJECT / "scripts"))
