"""`python -m ctsma.jit` (run by `make venv`) compiles the kernels that the phantom, the dataset's MR reference and
the morphometry command use, for the argument types they pass: a later process compiles none of them again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SRC = str(Path(__file__).resolve().parents[1] / "src")

# a later process: a knee of another seed and size, the dataset's MR reference of a larger patch, and the
# morphometry of a larger volume; then every ctsma numba dispatcher that missed the cache
USE = """
import json, sys, tempfile
import numpy as np
from numba.core.registry import CPUDispatcher
from ctsma.jit import TINY_KNEE
from ctsma.morphometry import bvf_binarise, local_thickness, measure_batch
from ctsma.morphometry.parameters import phase_pair_thickness
from ctsma.phantom import generate_knee, make_settings

generate_knee(make_settings("demo", {**TINY_KNEE, "mr_fov": [70.0, 60.0, 24.0]}), 5, 1, tempfile.mkdtemp())
rng = np.random.default_rng(3)
mr = rng.random((20, 20, 20)).astype(np.float32)
roi = np.zeros(mr.shape, bool)
roi[3:17, 2:18, 4:16] = True
bone, mask, _ = bvf_binarise(mr, roi)
measure_batch(np.stack([bone, bone[::-1]]), (0.1, 0.125, 0.125), masks=np.stack([mask, mask[::-1]]), workers=2)
vol = rng.random((30, 28, 26)) < 0.3
phase_pair_thickness(vol, ~vol, (0.6, 0.5, 0.5), "default", 2)
local_thickness(vol, (0.6, 0.5, 0.5))
missed = sorted(f"{name}.{k}" for name, mod in list(sys.modules.items()) if name.startswith("ctsma")
                for k, v in vars(mod).items() if isinstance(v, CPUDispatcher) and v.stats.cache_misses)
print(json.dumps(missed))
"""


def test_the_warm_up_compiles_what_later_processes_use(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "PYTHONPATH": SRC}
    warm = subprocess.run([sys.executable, "-m", "ctsma.jit"], env=env, capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, warm.stderr
    assert [line.split(":")[1].strip() for line in warm.stdout.splitlines()] == [
        "phantom knee", "MR reference", "local thickness"]
    assert any((tmp_path / "numba").rglob("*.nbc"))
    use = subprocess.run([sys.executable, "-c", USE], env=env, capture_output=True, text=True, timeout=600)
    assert use.returncode == 0, use.stderr
    assert json.loads(use.stdout.strip().splitlines()[-1]) == []
