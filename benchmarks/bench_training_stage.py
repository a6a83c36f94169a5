"""The demo's training stage alone, on a finished demo's store:
.venv/bin/python benchmarks/bench_training_stage.py --demo demo_out --out /tmp/ts [--compare OTHER_OUT]

Runs ``ctsma.demo.stages.training`` (the nine CNNs of the 3-fold cross-fitting, as the demo runs them with its
default settings) into OUT/training, with OUT/dataset a link to DEMO/dataset, and prints the stage's seconds. With
``--compare`` it also says whether the nine model files' tensors equal those of another such run (or of a demo's
own training folder). To time another version of the code, run this script from that checkout (its ``src`` first
on ``PYTHONPATH``) into another OUT, one run after the other on a quiet machine: the seventeenth session's lanes
against the session's start commit gave 461 s against 474 s, with identical tensors (docs/demo.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True, help="a finished demo's output folder (its dataset/store is used)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", default=None, help="another run's OUT (or a demo folder) to compare tensors with")
    a = ap.parse_args()
    import numpy as np
    from safetensors.numpy import load_file

    from ctsma.demo import stages
    from ctsma.demo.settings import DemoSettings

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "dataset").exists():
        (out / "dataset").symlink_to(Path(a.demo).resolve() / "dataset")
    (out / "training").mkdir(exist_ok=True)
    ctx = stages.Context(out.resolve(), DemoSettings())
    t = time.perf_counter()
    stages.training(ctx, out / "training")
    res = {"seconds": round(time.perf_counter() - t, 1), "ctsma": stages.__file__}
    if a.compare:
        files = sorted((out / "training").glob("fold*/*.safetensors"))
        same = []
        for f in files:
            x, y = load_file(f), load_file(Path(a.compare) / "training" / f.parent.name / f.name)
            same.append(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x))
        res["identical_tensors"] = f"{sum(same)} of {len(files)}"
    print(json.dumps(res))


if __name__ == "__main__":
    main()
