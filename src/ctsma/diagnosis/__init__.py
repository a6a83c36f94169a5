"""Patient-level knee OA diagnosis from patch-wise trabecular parameters.

Public API::

    from ctsma.diagnosis import cross_validate, compare_sources, train, predict, save, load
    res = cross_validate(patch_table, labels, aggregator="transformer", folds=5, seed=0)
    res.oof        # per-patient out-of-fold OA probability and severity
    res.metrics    # auc, auc_ci, accuracy, sensitivity, specificity, f1, brier, severity_mae, severity_r2, ...
    model = train(patch_table, labels, aggregator="transformer", seed=0)   # with its CV performance
    save(model, "diagnosis.safetensors");  model = load("diagnosis.safetensors")
    predict(model, patch_table)    # one row per knee: oa_probability, severity, message

See ``docs/diagnosis.md``.
"""

from .aggregators import AGGREGATORS, DEFAULTS, make_aggregator
from .data import NoValidPatchesError, build_kneeset, check_labels, check_patch_table
from .evaluation import CVResult, compare_sources, cross_validate, paired_auc_test, score
from .model import DiagnosisModel, load, predict, save, train

__all__ = ["AGGREGATORS", "DEFAULTS", "make_aggregator", "NoValidPatchesError", "build_kneeset", "check_labels",
           "check_patch_table", "CVResult", "compare_sources", "cross_validate", "paired_auc_test", "score",
           "DiagnosisModel", "load", "predict", "save", "train"]
