"""Test helper: run a worker script as W ranks (gloo, or NCCL on GPUs) on localhost and collect what each saved."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Path, world: int, out: Path, timeout: float = 300) -> list[dict]:
    """Start ``worker RANK WORLD PORT OUT`` for every rank; return each rank's ``OUT/rank{r}.pt``.

    Fails with the rank's output if any rank exits non-zero.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(world), str(port), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
