"""fakegpt's tracking: every MLflow call goes through this package, and every tag and metric name is defined here.

This module is the package's public face: code elsewhere imports `from fakegpt import tracking` and uses
`tracking.run`, `tracking.M_VAL_LOSS`, `tracking.MetricLogger` and so on, without knowing which module below
holds them. The modules:

- `names`: tag, metric and parameter names (defined once, so runs of different stages line up in the compare
  view), and the functions that build per-source, per-topic and paired metric names;
- `runs`: a stage's run (tracking URI, starting or joining it, ending it with the right status), its tags,
  parameters and metrics, and queries over other runs;
- `artifacts`: files logged to and downloaded from runs, datasets recorded as run inputs;
- `sender`: `MetricLogger`, which sends a long run's metrics from a background thread and rides out a tracking
  server's outage;
- `registry`: registering a fine-tuned model and reading a registered version's tags.

Chaining MLflow project entry points as child runs lives with its only user, `fakegpt.studies.steps`.
"""

from fakegpt.tracking.artifacts import download, is_artifact_uri, local_path, log_artifact, log_dataset_input
from fakegpt.tracking.names import *  # every tag and metric name, as tracking.M_* and tracking.TAG_*
from fakegpt.tracking.registry import model_version_tags, register_hf_model
from fakegpt.tracking.runs import (
    active_run_id,
    check_server,
    default_run_name,
    find_run_ids,
    flatten,
    get_run,
    join_run,
    log_dict,
    log_metrics,
    log_params,
    log_table,
    mark_experiment,
    metric_history,
    run,
    set_tags,
    setup,
    tag_values,
    update_run,
)
from fakegpt.tracking.sender import MetricLogger
