"""Both examples run end to end as scripts, with a tiny budget, on the bundled sample."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("plain", [False, True])
def test_dat_in_your_loop_runs(plain):
    out = _run("dat_in_your_loop.py", "--steps", "2", "--batch-size", "8",
               "--attack-steps", "1", "--eval-size", "20", *(["--plain"] if plain else []))
    assert "test accuracy: clean" in out and "on 20 images" in out
    assert ("acc_adv" in out) != plain  # the DAT step's stats only when DAT is on


def test_dat_adds_fewer_than_30_lines():
    lines = (EXAMPLES / "dat_in_your_loop.py").read_text().splitlines()
    added = [line for line in lines if "# DAT" in line]
    assert 0 < len(added) < 30


def test_amplitude_mix_example_runs():
    out = _run("amplitude_mix.py", "--steps", "2", "--batch-size", "8")
    assert "test accuracy: clean" in out and "amplitude-mixed" in out
