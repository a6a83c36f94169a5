"""Run the bad-input matrix of Testing/test_bad_input.py and print it as the Markdown of docs/reliability.md.

Every cell runs through ``ctsma.cli.main.main`` in this process; the message printed is the one a user sees
(temporary paths removed). Also writes benchmarks/results/reliability_matrix.json.

    .venv/bin/python benchmarks/reliability_matrix.py > /tmp/matrix.md
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "Testing"))

import test_bad_input as T  # noqa: E402

LABEL = {"error": "error (exit 2)", "warning": "warning (exit 0)", "row-failed": "row failed (exit 1)",
         "na": "not applicable"}
CODE = {"error": "E", "warning": "W", "row-failed": "R", "na": "–"}
SHORT = {"missing": "missing", "truncated": "trunc.", "corrupt": "corrupt", "image_2d": "2D", "image_4d": "4D",
         "nonfinite": "NaN", "zero_spacing": "0 sp.", "negative_spacing": "−sp.", "sheared": "shear",
         "huge": "huge", "mr_as_ct": "MR→CT", "seg_mismatch": "seg geom.", "empty_roi": "empty ROI",
         "model_tampered": "tampered", "model_pickle": "pickle", "model_wrong_kind": "wrong kind",
         "config_unknown": "cfg key", "config_range": "cfg range", "out_not_writable": "out RO"}


def run_matrix(tmp: Path) -> dict:
    class Factory:
        def mktemp(self, name):
            p = tmp / name
            p.mkdir()
            return p

    inp = T.inp.__wrapped__(Factory())
    T.models.__wrapped__(inp)
    os.environ["CTSMA_MAX_VOXELS"] = str(50_000_000)
    res = {}
    for ep, build in T.ENTRY_POINTS.items():
        for case in T.CASES:
            out = tmp / f"out{len(res)}"
            cell = build(case, inp, out)
            if cell.expect == "na":
                res[(ep, case)] = ("na", cell.reason)
                continue
            buf = io.StringIO()
            with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(buf):
                warnings.simplefilter("always")
                rc = T.cli_main(["--quiet", *map(str, cell.argv)])
            err = buf.getvalue()
            if cell.expect == "error":
                msg = next(ln for ln in err.splitlines() if ": error: " in ln).split(": error: ", 1)[1]
                assert rc == 2
            elif cell.expect == "warning":
                msg = next(str(w.message) for w in caught if re.search(cell.match, str(w.message)))
            else:
                import pandas as pd
                df = pd.read_csv(next(p for p in T._files_under(out) if p.suffix == ".csv"))
                msg = f"row failed: {df.error.iloc[0]}"
            res[(ep, case)] = (cell.expect, re.sub(r"/\S*/", "", msg))
    return res


def markdown(res: dict) -> str:
    eps = list(dict.fromkeys(k[0] for k in res))
    cases = list(dict.fromkeys(k[1] for k in res))
    lines = ["| entry point | " + " | ".join(SHORT[c] for c in cases) + " |", "|---|" + "---|" * len(cases)]
    for e in eps:
        lines.append(f"| `{e}` | " + " | ".join(CODE[res[(e, c)][0]] for c in cases) + " |")
    for e in eps:
        lines += ["", f"#### `ctsma {e}`", "", "| case | outcome | message (or why not applicable) |", "|---|---|---|"]
        for c in cases:
            kind, msg = res[(e, c)]
            msg = msg.replace("|", "\\|")
            lines.append(f"| {c} | {LABEL[kind]} | {msg if len(msg) <= 170 else msg[:167] + '…'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with tempfile.TemporaryDirectory() as d:
        res = run_matrix(Path(d))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "reliability_matrix.json").write_text(
        json.dumps({f"{e} | {c}": v for (e, c), v in res.items()}, indent=1, ensure_ascii=False) + "\n")
    print(markdown(res))


if __name__ == "__main__":
    main()
