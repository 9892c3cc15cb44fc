#!/usr/bin/env bash
# MLflow tracking server for QAT sweeps: PostgreSQL backend, proxied artifact store.
#
# Environment (no secret ever goes in a file or on the command line):
#   MLFLOW_BACKEND_STORE_URI      required, e.g. postgresql://mlflow@db-host:5432/mlflow
#                                 (password: PGPASSWORD or ~/.pgpass, read by the PostgreSQL driver)
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts go (default: ./mlartifacts; on a cluster s3://bucket/prefix
#                                 or a shared path); clients upload through the server (--serve-artifacts)
#   MLFLOW_HOST                   default 127.0.0.1 (loopback only)
#   MLFLOW_PORT                   default 5000
#   MLFLOW_ALLOW_REMOTE=1         required to bind anything but loopback; turns on MLflow basic auth, which
#                                 then needs MLFLOW_AUTH_ADMIN_PASSWORD (admin user's first password) and
#                                 MLFLOW_ALLOWED_HOSTS (Host headers to accept, e.g. mlflow.internal:5000)
#   MLFLOW_AUTH_DATABASE_URI      user store of basic auth (default: the backend store URI)
# Clients: MLFLOW_TRACKING_URI=http://<host>:<port> (+ MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD).
set -euo pipefail

backend=${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://mlflow@127.0.0.1:5432/mlflow}
artifacts=${MLFLOW_ARTIFACTS_DESTINATION:-$PWD/mlartifacts}
host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
args=(--backend-store-uri "$backend" --artifacts-destination "$artifacts" --serve-artifacts
      --host "$host" --port "$port")

case "$host" in
  127.0.0.1|localhost|::1) ;;
  *)
    if [ "${MLFLOW_ALLOW_REMOTE:-0}" != 1 ]; then
      echo "error: MLFLOW_HOST=$host exposes the server beyond loopback; set MLFLOW_ALLOW_REMOTE=1 to opt in" \
           "(basic auth is then required)" >&2
      exit 2
    fi
    : "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD: a remote server runs with basic auth}"
    : "${MLFLOW_ALLOWED_HOSTS:?set MLFLOW_ALLOWED_HOSTS, e.g. mlflow.internal:5000}"
    auth_ini=$(mktemp -d)/basic_auth.ini
    # no secret in this file: the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD
    cat > "$auth_ini" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-$backend}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
    export MLFLOW_AUTH_CONFIG_PATH=$auth_ini
    args+=(--app-name basic-auth --allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
    ;;
esac

echo "mlflow server on http://$host:$port (backend ${backend%%://*}://..., artifacts $artifacts)" >&2
exec mlflow server "${args[@]}"
