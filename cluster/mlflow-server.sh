#!/usr/bin/env bash
# The cluster's MLflow tracking server: a PostgreSQL backend store, artifacts in object storage,
# served through the server (--serve-artifacts) so jobs need no storage credentials, basic-auth
# users (--app-name basic-auth), a Host allow-list, bound to a private address.
#
#   MLFLOW_BACKEND_URI=postgresql://mlflow:PASSWORD@db.internal:5432/mlflow \
#   MLFLOW_ARTIFACTS_URI=s3://my-bucket/mlflow \
#   MLFLOW_HOST=10.0.0.5 MLFLOW_ALLOWED_HOSTS=mlflow.internal:5000,10.0.0.5:5000 \
#   MLFLOW_FLASK_SERVER_SECRET_KEY=$(openssl rand -hex 32) \
#   cluster/mlflow-server.sh
#
# Jobs point at it with MLFLOW_TRACKING_URI=http://<host>:5000 (cluster/runtime_env.yaml) and
# MLFLOW_TRACKING_USERNAME/PASSWORD from a secret. Change the admin password before anyone else
# can reach the server: `python cluster/mlflow_check.py http://<host>:5000` fails while the
# default admin password still works.
set -euo pipefail
: "${MLFLOW_BACKEND_URI:?a database URI, e.g. postgresql://user:pass@host:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_URI:?an artifact root, e.g. s3://bucket/mlflow}"
: "${MLFLOW_HOST:?a private address to bind to (not 0.0.0.0)}"
: "${MLFLOW_ALLOWED_HOSTS:?host:port values clients use to reach the server}"
if [[ "$MLFLOW_HOST" == "0.0.0.0" || "$MLFLOW_HOST" == "::" ]]; then
  echo "mlflow-server: refusing to bind to all interfaces; give MLFLOW_HOST a private address" >&2
  exit 2
fi
# MLflow 3's job runner (GenAI scorers, evaluation and prompt optimization: distrnn uses none of
# them) starts 8 more Python processes beside the server: measured with one worker, 1.85 GB
# against 0.49 GB, and 37 s to answer against 9-13 s, on 2 busy cores; each start also leaves a
# folder in /dev/shm. Set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to have it.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec mlflow server \
  --backend-store-uri "$MLFLOW_BACKEND_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_URI" --serve-artifacts \
  --app-name basic-auth \
  --host "$MLFLOW_HOST" --port "${MLFLOW_PORT:-5000}" \
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" \
  --workers "${MLFLOW_WORKERS:-4}"
