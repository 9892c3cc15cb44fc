#!/usr/bin/env bash
# Submit a QAT sweep to a running Ray cluster as a Ray job.
#   launch/ray/submit.sh HEAD_ADDRESS [qat-sweep overrides ...]
#   e.g. launch/ray/submit.sh 10.0.0.10 sweep=default trainer=gpu trainer.storage_path=/mnt/shared/qat \
#          paths.root=/mnt/shared/qat-outputs tracking=server
# HEAD_ADDRESS: host or host:port of the head's dashboard (port 8265 by default).
# Environment: MLFLOW_TRACKING_URI (required: the tracking server the trials log to),
#   RAY_AUTH_TOKEN or ~/.ray/auth_token (token auth), QAT_SUBMIT_NO_WAIT=1 to return right after
#   submitting. MLflow credentials (MLFLOW_TRACKING_USERNAME / _PASSWORD) are NOT passed here: Ray
#   keeps a job's runtime env in its job table; give them to the nodes' environment instead.
# Watch: ray job logs --address http://HEAD:8265 --follow <submission id>;  stop: ray job stop <id>.
set -euo pipefail
head=${1:?usage: submit.sh HEAD_ADDRESS [qat-sweep overrides ...]}
shift
case "$head" in *:*) ;; *) head="$head:8265" ;; esac
case "$head" in http://*|https://*) ;; *) head="http://$head" ;; esac
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI to the MLflow server the trials log to}"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
repo=$(cd "$(dirname "$0")/../.." && pwd)

env_json=$(python3 - <<PY
import json, os
env = {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"], "PYTHONUNBUFFERED": "1",
       "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # job-wide: Train workers print each line once
for key in ("QAT_CACHE_DIR",):
    if os.environ.get(key):
        env[key] = os.environ[key]
print(json.dumps({"env_vars": env, "excludes": [".venv", "outputs", "multirun", "*.db", ".git", "mlartifacts"]}))
PY
)
wait_flag=()
[ "${QAT_SUBMIT_NO_WAIT:-0}" = 1 ] && wait_flag=(--no-wait)
exec ray job submit --address "$head" --working-dir "$repo" --runtime-env-json "$env_json" "${wait_flag[@]}" \
  -- qat-sweep tracking=server "$@"
