#!/bin/sh
# Entrypoint of the MLflow server image: render the basic-auth configuration from the environment, then run the
# command (by default `mlflow server ...`, see docker-compose.yaml).
#
#   MLFLOW_AUTH_DATABASE_URI   SQLAlchemy URL of the users/permissions database (required), e.g.
#                              postgresql+psycopg://user:password@postgres:5432/mlflow_auth
#   MLFLOW_AUTH_CONFIG_PATH    where to write the rendered ini; MLflow reads this variable too
#   MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD   the admin created on first start (read by MLflow)
#   MLFLOW_AUTH_READER_USERNAME / MLFLOW_AUTH_READER_PASSWORD optional: a user who is not an admin, created (or
#                              given this password) before the server starts; with default_permission = READ it
#                              reads every experiment and model and changes nothing. The model server logs in
#                              with it, so that a compromised model server cannot move Production.
#   MLFLOW_AUTH_TEMPLATE       the template (default: basic_auth.ini next to this script)
#
# tests/test_stack.py runs this same script natively, so what the image does at start-up is tested.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
template=${MLFLOW_AUTH_TEMPLATE:-$here/basic_auth.ini}
: "${MLFLOW_AUTH_CONFIG_PATH:?set MLFLOW_AUTH_CONFIG_PATH (where the rendered basic-auth ini goes)}"
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI (the basic-auth user database)}"

mkdir -p "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")"
umask 077
python - "$template" "$MLFLOW_AUTH_CONFIG_PATH" <<'PY'
import os
import re
import sys

source, target = sys.argv[1], sys.argv[2]
pattern = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
lines = [line for line in open(source).read().splitlines(keepends=True) if not line.lstrip().startswith("#")]
text = "".join(lines)
missing = sorted({m.group(1) for m in pattern.finditer(text) if m.group(2) is None and not os.environ.get(m.group(1))})
if missing:
    sys.exit(f"mlflow entrypoint: {source} needs {', '.join(missing)}")


def value(match):
    found = os.environ.get(match.group(1)) or match.group(2) or ""
    return found.replace("%", "%%")  # configparser interpolation


with open(target, "w") as handle:
    handle.write(pattern.sub(value, text))
PY
echo "mlflow entrypoint: basic-auth configuration written to $MLFLOW_AUTH_CONFIG_PATH"

if [ -n "${MLFLOW_AUTH_READER_USERNAME:-}" ]; then
    : "${MLFLOW_AUTH_READER_PASSWORD:?set MLFLOW_AUTH_READER_PASSWORD (the read-only user's password)}"
    python - <<'PY'
import os

from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

name, password = os.environ["MLFLOW_AUTH_READER_USERNAME"], os.environ["MLFLOW_AUTH_READER_PASSWORD"]
if name == os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME"):
    raise SystemExit("mlflow entrypoint: the read-only user must not be the admin")
store = SqlAlchemyStore()
store.init_db(os.environ["MLFLOW_AUTH_DATABASE_URI"])
if store.has_user(name):
    store.update_user(name, password=password, is_admin=False)
else:
    store.create_user(name, password, is_admin=False)
print(f"mlflow entrypoint: read-only user '{name}' is ready")
PY
fi
exec "$@"
