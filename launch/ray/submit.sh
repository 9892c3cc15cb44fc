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
# Right after `ray start` the head's job agent may not have registered yet ("No available agent to
# submit job"): submission is retried for up to ~30 s, then the job's logs are followed to its end.
submit=(ray job submit --address "$head" --working-dir "$repo" --runtime-env-json "$env_json" --no-wait
        -- qat-sweep tracking=server "$@")
for attempt in $(seq 1 10); do
  if out=$("${submit[@]}" 2>&1); then break; fi
  if [ "$attempt" -lt 10 ] && grep -q "No available agent" <<<"$out"; then sleep 3; continue; fi
  printf '%s\n' "$out" >&2
  exit 1
done
printf '%s\n' "$out"
id=$(grep -o "raysubmit_[A-Za-z0-9]*" <<<"$out" | head -n 1)
[ "${QAT_SUBMIT_NO_WAIT:-0}" = 1 ] && exit 0
ray job logs --address "$head" --follow "$id"   # ends with the job's status ("Job '...' succeeded")
# The exit status: 0 on success. The status is read whole before grep: `ray job status | grep -q` under
# pipefail fails at random when grep exits on its match while ray still writes (SIGPIPE, status 141).
status=$(ray job status --address "$head" "$id" 2>&1) || true
if ! grep -q "Job '$id' succeeded" <<<"$status"; then
  printf 'submit.sh: job %s did not succeed:\n%s\n' "$id" "$status" >&2
  exit 1
fi
