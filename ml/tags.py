"""The names of every tag the service writes on MLflow runs, model versions and the registered model.

They are the registry's public vocabulary (``mlops status``, the model server and people in the MLflow UI read them),
so each is spelled here once.
"""

PREFIX = "mlops."

# Who and what produced a run or version (lineage).
AIRFLOW_DAG_ID = "mlops.airflow.dag_id"
AIRFLOW_RUN_ID = "mlops.airflow.run_id"
AIRFLOW_TRY_NUMBER = "mlops.airflow.try_number"
AIRFLOW_RUN_KEY = "mlops.airflow.run_key"
AIRFLOW_URL = "mlops.airflow.url"
CODE_REVISION = "mlops.code.revision"
DATA_DIGEST = "mlops.data.digest"
DATA_SNAPSHOT_URI = "mlops.data.snapshot_uri"
# The rows the version was fitted on: a later candidate is compared with it only on held-out rows not among them.
DATA_TRAIN_SPLIT_URI = "mlops.data.train_split_uri"
RANDOM_SEED = "mlops.random_seed"
MODEL_FAMILY = "mlops.model_family"

# A DAG run's training in MLflow: one parent run, and a child run per candidate (MLflow's own mlflow.parentRunId).
RUN_ROLE = "mlops.run.role"
CANDIDATE_INDEX = "mlops.candidate.index"
CANDIDATE_MODEL_URI = "mlops.candidate.model_uri"
PARENT_RUN_ID = "mlflow.parentRunId"
# On the version: every candidate of its run side by side (JSON, ml.selection.summary()), and why it was chosen.
CANDIDATES = "mlops.candidates"
CANDIDATES_SELECTION = "mlops.candidates.selection"
CANDIDATES_METRIC = "mlops.candidates.selection_metric"

# Drift of the version's data against the data of the Production version it was compared with.
DRIFT_MAX_PSI = "mlops.drift.max_psi"
DRIFT_MAX_PSI_FEATURE = "mlops.drift.max_psi_feature"
DRIFT_MIN_KS_PVALUE = "mlops.drift.min_ks_pvalue"
DRIFT_LABEL_SHIFT = "mlops.drift.label_shift"
DRIFT_HIGH = "mlops.drift.high"
DRIFT_THRESHOLD = "mlops.drift.threshold"
DRIFT_REFERENCE_VERSION = "mlops.drift.reference_version"

# The validation verdict.
VALIDATION_STATUS = "mlops.validation.status"
VALIDATION_ACCURACY = "mlops.validation.accuracy"
VALIDATION_THRESHOLD = "mlops.validation.threshold"
VALIDATION_CHAMPION_VERSION = "mlops.validation.champion_version"
VALIDATION_CHAMPION_ACCURACY = "mlops.validation.champion_accuracy"
# The comparison with Production: on how many held-out rows, how many were left out because Production trained on
# them, the candidate's accuracy on those same rows, and a sentence saying which rows and why.
VALIDATION_COMPARISON_ROWS = "mlops.validation.comparison_rows"
VALIDATION_COMPARISON_EXCLUDED_ROWS = "mlops.validation.comparison_excluded_rows"
VALIDATION_COMPARISON_ACCURACY = "mlops.validation.comparison_accuracy"
VALIDATION_COMPARISON_NOTE = "mlops.validation.comparison_note"
VALIDATION_REASONS = "mlops.validation.reasons"
VALIDATION_VALIDATED_AT = "mlops.validation.validated_at"

# Where the version stands in deployment, and the record of its moves.
DEPLOYMENT_STATUS = "mlops.deployment.status"
# How the version got into Production: "promoted", "manual_rollback" or "restored" (by a rollback or a repair).
DEPLOYMENT_EVENT = "mlops.deployment.event"
DEPLOYMENT_DEMOTED_AT = "mlops.deployment.demoted_at"
DEPLOYMENT_DEMOTED_REASON = "mlops.deployment.demoted_reason"
DEPLOYMENT_REASON = "mlops.deployment.reason"
DEPLOYMENT_PROMOTED_AT = "mlops.deployment.promoted_at"
DEPLOYMENT_PROMOTED_BY = "mlops.deployment.promoted_by"
DEPLOYMENT_REPLACED_VERSION = "mlops.deployment.replaced_version"
DEPLOYMENT_REPLACED_BY = "mlops.deployment.replaced_by"
DEPLOYMENT_ARCHIVED_AT = "mlops.deployment.archived_at"
DEPLOYMENT_RESTORED_AT = "mlops.deployment.restored_at"
DEPLOYMENT_RESTORED_BY = "mlops.deployment.restored_by"
DEPLOYMENT_ROLLED_BACK_AT = "mlops.deployment.rolled_back_at"
DEPLOYMENT_ROLLBACK_REASON = "mlops.deployment.rollback_reason"
DEPLOYMENT_RESTORED_VERSION = "mlops.deployment.restored_version"
DEPLOYMENT_DEPLOYED_AT = "mlops.deployment.deployed_at"
DEPLOYMENT_AIRFLOW_DAG_ID = "mlops.deployment.airflow_dag_id"
DEPLOYMENT_AIRFLOW_RUN_ID = "mlops.deployment.airflow_run_id"
DEPLOYMENT_ACCURACY = "mlops.deployment.accuracy"
DEPLOYMENT_DATA_DIGEST = "mlops.deployment.data_digest"
DEPLOYMENT_HEALTH_CHECK = "mlops.deployment.health_check"

# On the registered model: one entry per move of Production, keyed by time and version.
HISTORY_PREFIX = "mlops.history."
