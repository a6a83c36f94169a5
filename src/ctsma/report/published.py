"""Published figures of the method, shown beside ours and always labelled "published, clinical cohort".

Sources (see ``/work/shared/notes/science.md``):

* preprint, arXiv 2307.04390 (2023, "SRRD"): per-parameter ICC of CT-derived vs MR reference parameters;
* journal paper (2026): mean ICC 0.742 "across key biomarkers" and Table 6 (diagnosis; every row uses
  Transformer aggregation of patch parameters to a patient). Table 7: aggregator AUCs.

These are from a clinical cohort of real patients; our numbers come from the digital phantom, so the two
are context for each other, not a like-for-like comparison.
"""

from __future__ import annotations

PUBLISHED_LABEL = "published, clinical cohort"

PUBLISHED_MEAN_ICC = 0.742
"""Journal paper: ICC "across key biomarkers" (ICC type not stated)."""

PUBLISHED_ICC = {"BV/TV": 0.804, "Tb.Th": 0.773, "Tb.Sp": 0.711, "Tb.N": 0.622}
"""Preprint: ICC of CT-derived (distilled) vs MR reference parameters, per parameter (type not stated)."""

PUBLISHED_DIAGNOSIS = {
    # label: (precision, recall, F1, AUC, MOAKS MAE, MOAKS R²), all with Transformer aggregation
    "Radiomics on CT": (0.689, 0.773, 0.738, 0.742, 1.438, 0.723),
    "CNN on CT, no distillation": (0.745, 0.794, 0.763, 0.778, 1.059, 0.790),
    "CT-SMA (distilled)": (0.863, 0.903, 0.879, 0.883, 0.893, 0.881),
    "CNN on MR (upper reference)": (0.887, 0.935, 0.910, 0.914, 0.876, 0.903),
}
"""Journal Table 6. Severity is the MOAKS score there; on the phantom it is the phantom's severity."""

PUBLISHED_AGGREGATOR_AUC = {"MLP": 0.742, "CNN": 0.872, "Transformer": 0.883, "Transformer on MR parameters": 0.914}
"""Journal Table 7: AUC of aggregators on CT-SMA parameters."""

PUBLISHED_SOURCE_FOR = {"student_distilled": "CT-SMA (distilled)", "student_baseline": "CNN on CT, no distillation",
                        "radiomics": "Radiomics on CT", "teacher": "CNN on MR (upper reference)",
                        "mr_reference": "CNN on MR (upper reference)"}
"""Which published Table 6 row corresponds to each of our sources."""
