"""Statistics shared by every evaluation of the project.

- :mod:`.agreement`: ICC(2,1) and ICC(3,1) with F-based 95 % CIs, Pearson r, MAE, Bland–Altman.
- :mod:`.bootstrap`: patient-level (cluster) bootstrap CIs and paired differences.
- :mod:`.classification`: AUC with DeLong CI, DeLong test of two correlated AUCs, threshold
  metrics, Brier score, regression MAE and R².

Every function takes plain arrays and returns plain floats (or small frozen dataclasses), so results
drop straight into ``metrics.json`` via :func:`ctsma.io.write_json`.
"""

from .agreement import ICCResult, icc, icc21, icc31, icc_value, pearson_r, mae, bland_altman, agreement_summary
from .bootstrap import BootstrapResult, cluster_bootstrap, cluster_bootstrap_diff
from .classification import (AUCResult, DeLongTest, auc_delong, delong_test, binary_metrics, brier_score,
                             regression_metrics, r2_score)

__all__ = [
    "ICCResult", "icc", "icc21", "icc31", "icc_value", "pearson_r", "mae", "bland_altman", "agreement_summary",
    "BootstrapResult", "cluster_bootstrap", "cluster_bootstrap_diff",
    "AUCResult", "DeLongTest", "auc_delong", "delong_test", "binary_metrics", "brier_score",
    "regression_metrics", "r2_score",
]
