"""``python -m dptrain`` runs the ``dptrain`` command."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_python_dash_m_dptrain_runs_the_cli():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "dptrain", "epsilon", "--sigma", "1", "--sample-rate", "0.01",
                           "--steps", "100", "--delta", "1e-5"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) > 0
    done = subprocess.run([sys.executable, "-m", "dptrain", "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0 and "demo" in done.stdout
