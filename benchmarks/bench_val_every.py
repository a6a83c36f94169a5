"""Training time with validation every epoch against every N epochs, side by side on one machine.

    .venv/bin/python benchmarks/bench_val_every.py --crossfit-work /tmp/cf [--every 5] [--fold 0]

``--crossfit-work`` is a work folder of ``bench_crossfit.py`` (its ``config.yaml`` and ``dataset/store``). Two
spawned processes, one torch thread each (as the demo trains), train the fold's teacher, distilled student and
baseline at the same time: one with ``optim.val_every: 1``, the other with ``--every``. Prints each training's
seconds, checks that the exported weights are identical, and writes ``benchmarks/results/bench_val_every.json``.
The process that finishes first leaves the other alone on the machine for its last minutes, so the saving is, if
anything, underestimated.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path


def run(crossfit_work: str, fold: int, every: int, out: str) -> dict:
    import yaml

    from ctsma.config import to_dict
    from ctsma.demo import stages
    from ctsma.demo.settings import DemoSettings
    from ctsma.models import load_train_config, train

    work = Path(crossfit_work).resolve()  # the config written under ``out`` must not hold relative paths
    seed = int(yaml.safe_load((work / "config.yaml").read_text())["trainer"]["seed"])
    ctx = stages.Context(work, DemoSettings(folds=3, seed=seed, train_config=str(work / "config.yaml")))
    d = to_dict(stages.fold_config(ctx, fold))
    d.pop("base_dir", None)
    d["optim"]["val_every"] = every
    d["output"]["dir"] = out
    d["trainer"].update(progress_bar=False, threads=1)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "config.yaml").write_text(yaml.safe_dump(d))
    cfg = load_train_config(Path(out) / "config.yaml")
    res = {}
    for role in ("teacher", "student", "baseline"):
        t = time.perf_counter()
        res[role] = str(train(role, cfg))
        res[f"{role}_s"] = round(time.perf_counter() - t, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crossfit-work", required=True)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--out", default="/tmp/ctsma_bench_val_every")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    if a.every < 2:
        ap.error("--every must be at least 2 (it is compared with validating every epoch)")
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as ex:
        futs = {e: ex.submit(run, a.crossfit_work, a.fold, e, f"{a.out}/every{e}") for e in (1, a.every)}
        res = {e: f.result() for e, f in futs.items()}
    import torch
    from safetensors.torch import load_file

    same = {}
    for role in ("teacher", "student", "baseline"):
        x, y = load_file(res[1][role]), load_file(res[a.every][role])
        same[role] = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    out = {"fold": a.fold, "every": a.every, "seconds": {e: {k: v for k, v in r.items() if k.endswith("_s")}
                                                         for e, r in res.items()},
           "identical_weights": same}
    for e, r in out["seconds"].items():
        print(f"val_every {e}: " + ", ".join(f"{k[:-2]} {v} s" for k, v in r.items()) + f"; total {sum(r.values()):.1f} s")
    print("identical exported weights:", same)
    p = Path(a.results) / "bench_val_every.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=1))
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
