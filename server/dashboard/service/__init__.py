"""Read models: registry snapshots turned into the API's response models, scoped to the caller.

The routers stay thin and the pages reuse the same functions, so the HTML and the JSON can never
disagree about what a site token may see. Everything is computed from the registry (the dashboard
keeps only what it built from a run until the run changes, :mod:`.cache`), through the registry's
facade; where the facade has no query for something (a status filter on runs, a site filter on
the audit log) the filtering happens here, which is fine at the scale of one federation's registry.

One module per resource, as the routers are; the response models are validated from the
registry's snapshots (``model_validate``), never filled in field by field.
"""

from .audit import audit_list
from .cache import results_of
from .charts import drift_map, run_charts, run_charts_json
from .downloads import ledger_csv, metrics_csv, results_json
from .rounds import federation_accuracy_by_round, metric_list, round_list
from .runs import all_runs, list_runs, matrix_out, run_detail, run_out, task_list
from .sites import site_detail, site_list
from .versions import one_version, version_list

__all__ = [
    "all_runs",
    "audit_list",
    "federation_accuracy_by_round",
    "ledger_csv",
    "list_runs",
    "matrix_out",
    "metric_list",
    "metrics_csv",
    "one_version",
    "results_json",
    "results_of",
    "run_out",
    "round_list",
    "drift_map",
    "run_charts",
    "run_charts_json",
    "run_detail",
    "site_detail",
    "site_list",
    "task_list",
    "version_list",
]
