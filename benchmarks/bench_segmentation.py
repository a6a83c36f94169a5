"""Benchmark: automatic bones and subchondral ROIs against the phantom's truth, over a whole cohort.

Two modes: `native` (on the CT grid, as `ctsma segment` does) and `infer` (on the 0.7 x 0.7 x 1.0 mm copy that
`ctsma infer` uses for speed, labels resampled back). Targets (issue 6): femur and tibia Dice >= 0.95, ROI Dice >= 0.85.

    .venv/bin/python benchmarks/bench_segmentation.py [COHORT_DIR]     # default: demo_out/phantom (from `make demo`)

A held-out cohort (a seed the ROI definition was never looked at on), as reported in docs/segmentation.md:

    .venv/bin/ctsma phantom --n 12 --seed 101 --preset demo --out heldout_101
    .venv/bin/python benchmarks/bench_segmentation.py heldout_101    # -> results/bench_segmentation_heldout_101.csv
"""

import warnings
from pathlib import Path

import pandas as pd
import SimpleITK as sitk

from ctsma import ROIS
from ctsma.inference.engine import InferSettings, _coarse_copy, _to_grid
from ctsma.segmentation import segment_bones, subchondral_rois

ROOT = Path(__file__).resolve().parents[1]


def dice(a, b, v) -> float:
    return 2 * ((a == v) & (b == v)).sum() / max(1, (a == v).sum() + (b == v).sum())


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cohort", nargs="?", type=Path, help="phantom cohort folder (default: demo_out/phantom)")
    given = ap.parse_args().cohort
    root = given or ROOT / "demo_out" / "phantom"
    m = pd.read_csv(root / "manifest.csv")
    rows = []
    for r in m.itertuples():
        ct = sitk.ReadImage(str(root / r.ct), sitk.sitkFloat32)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(root / r.ct_rois)))
        tb = sitk.GetArrayFromImage(sitk.ReadImage(str(root / r.ct_bones)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for mode in ("native", "infer"):
                c = ct if mode == "native" else _coarse_copy(ct, InferSettings().segmentation_spacing_mm)
                b = segment_bones(c)
                ro = subchondral_rois(c, b, side=r.side)
                a = sitk.GetArrayFromImage(_to_grid(ro, ct))
                ab = sitk.GetArrayFromImage(_to_grid(b, ct))
                rows.append({"subject": r.subject, "mode": mode, **{k: dice(a, truth, v) for k, v in ROIS.items()},
                             "femur": dice(ab, tb, 1), "tibia": dice(ab, tb, 2)})
    df = pd.DataFrame(rows)
    name = "bench_segmentation.csv" if given is None else f"bench_segmentation_{root.name}.csv"
    out = ROOT / "benchmarks" / "results" / name
    df.to_csv(out, index=False)
    print(df.drop(columns="subject").groupby("mode").agg(["mean", "min"]).round(3).T)
    print(f"per-knee values: {out}")


if __name__ == "__main__":
    main()
