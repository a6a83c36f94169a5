"""Batch-mode throughput of two checkouts, side by side: which of two versions of the batch kernel is faster.

Run:  .venv/bin/python benchmarks/bench_morphometry_ab.py --a OTHER_CHECKOUT [--b .] [--rounds 3] [--tag T]
(for example ``git worktree add /tmp/prev HEAD~1`` for OTHER_CHECKOUT).

Each round runs ``bench_morphometry.batch()`` (120 patches of 64³, 1 and 2 workers, CPU ms by stage) of each
checkout in a fresh process, alternating A and B, so that the machine's drifting speed falls on both alike. Writes
benchmarks/results/bench_morphometry_ab[_T].json with every round's figures and the means.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CODE = """
import json, sys
sys.path.insert(0, {bench!r})
import bench_morphometry as b
import ctsma
assert ctsma.__file__.startswith({root!r}), ctsma.__file__
r = b.batch(False)
print(json.dumps({{"per_s": {{k: v["patches_per_s"] for k, v in r.items() if k.endswith("_workers")}},
                  "cpu_ms_by_stage": r["cpu_ms_per_patch_by_stage"]}}))
"""


def run(root: Path) -> dict:
    code = CODE.format(bench=str(root / "benchmarks"), root=str(root))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/tmp")
    if res.returncode:
        raise SystemExit(f"{root}: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="the other checkout (the baseline)")
    ap.add_argument("--b", default=str(ROOT), help="this checkout (default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    roots = {"a": Path(args.a).resolve(), "b": Path(args.b).resolve()}
    out = {"checkouts": {k: str(v) for k, v in roots.items()}, "rounds": {"a": [], "b": []}}
    for i in range(args.rounds):
        for name, root in roots.items():
            r = run(root)
            out["rounds"][name].append(r)
            print(f"round {i + 1} {name}: {r['per_s']['1_workers']:.1f} patches/s with 1 worker, "
                  f"{r['per_s']['2_workers']:.1f} with 2", flush=True)
    out["mean"] = {name: {w: float(np.mean([r["per_s"][w] for r in rr])) for w in ("1_workers", "2_workers")}
                   for name, rr in out["rounds"].items()}
    out["ratio_b_over_a"] = {w: out["mean"]["b"][w] / out["mean"]["a"][w] for w in ("1_workers", "2_workers")}
    path = ROOT / "benchmarks" / "results" / f"bench_morphometry_ab{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"B / A: {out['ratio_b_over_a']['1_workers']:.2f} (1 worker), {out['ratio_b_over_a']['2_workers']:.2f} "
          f"(2 workers); wrote {path}")


if __name__ == "__main__":
    main()
