#!/usr/bin/env bash
# The MLflow user a cluster's nodes and pods log as: an ordinary user (never the admin) allowed to
# EDIT the sweeps' experiment and nothing else. Run once by whoever holds the admin password, from
# any machine that reaches the server:
#   MLFLOW_TRACKING_URI=http://mlflow.internal:5000 MLFLOW_TRACKING_USERNAME=admin \
#   MLFLOW_TRACKING_PASSWORD=<admin password> QAT_WORKER_PASSWORD=<new password> \
#   launch/mlflow-worker-user.sh [username (qat-worker)] [experiment (qat)]
# then give the nodes MLFLOW_TRACKING_USERNAME=qat-worker / MLFLOW_TRACKING_PASSWORD=<new password>
# (KubeRay: the qat-mlflow-client Secret). The worker user creates the sweeps' registered models
# itself, so it manages those and no others. Passwords come from the environment, never arguments.
set -euo pipefail
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI}"
: "${MLFLOW_TRACKING_USERNAME:?set MLFLOW_TRACKING_USERNAME to the admin user}"
: "${MLFLOW_TRACKING_PASSWORD:?set MLFLOW_TRACKING_PASSWORD to the admin password}"
: "${QAT_WORKER_PASSWORD:?set QAT_WORKER_PASSWORD to the new password of the worker user}"
exec python3 - "${1:-qat-worker}" "${2:-qat}" <<'PY'
import os
import sys

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient

user, experiment = sys.argv[1], sys.argv[2]
uri = os.environ["MLFLOW_TRACKING_URI"]
auth = AuthServiceClient(uri)
try:
    auth.get_user(user)
    print(f"user {user} exists")
except MlflowException as exc:
    if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
        raise
    auth.create_user(user, os.environ["QAT_WORKER_PASSWORD"])
    print(f"created user {user} (not an admin)")
client = MlflowClient(uri)
exp = client.get_experiment_by_name(experiment)
exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
try:
    auth.grant_user_permission(user, "experiment", exp_id, "EDIT")
except MlflowException as exc:  # a second run: the permission is there; make sure it is EDIT
    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
        raise
    auth.revoke_user_permission(user, "experiment", exp_id)
    auth.grant_user_permission(user, "experiment", exp_id, "EDIT")
print(f"{user}: EDIT on experiment {experiment} ({exp_id}); nothing else")
PY
