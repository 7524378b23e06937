"""KEDA objects checked against KEDA's own API schema: the npm package @kubernetes-models/keda (models generated
from kedacore/keda v2's Go types, the CRDs' source), installed once into .cache/ with the machine's npm."""

import json
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent / "keda"
PROJECT = Path(__file__).resolve().parents[2]
CACHE = PROJECT / ".cache" / "keda-schema"


def _installed():
    package = json.loads((HERE / "package.json").read_text())
    marker = CACHE / "node_modules" / ".celery-fleet-installed"
    if not marker.exists() or marker.read_text() != json.dumps(package, sort_keys=True):
        CACHE.mkdir(parents=True, exist_ok=True)
        shutil.copy(HERE / "package.json", CACHE / "package.json")
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=CACHE, check=True,
                       capture_output=True, text=True, timeout=600)
        marker.write_text(json.dumps(package, sort_keys=True))
    shutil.copy(HERE / "validate.mjs", CACHE / "validate.mjs")
    return CACHE


def validate(objects):
    """{"Kind/name": error or None} for each KEDA object."""
    directory = _installed()
    run = subprocess.run(["node", "validate.mjs"], cwd=directory, input=json.dumps(objects), capture_output=True,
                         text=True, timeout=120, check=True)
    return dict(json.loads(run.stdout))
