#!/usr/bin/env bash
# airflow-init: migrate Airflow's metadata database and create the admin user of the simple auth manager.
#
# Run once before the other Airflow services (docker-compose.yaml's airflow-init; natively by tests/test_stack.py).
# The simple auth manager reads its users from AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS ("<name>:admin") and their
# passwords from the JSON file AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE; this script writes the admin's
# password, taken from AIRFLOW_ADMIN_PASSWORD, into that file (kept: other users' entries; replaced: the admin's).
set -euo pipefail

: "${AIRFLOW_ADMIN_USERNAME:?set AIRFLOW_ADMIN_USERNAME}"
: "${AIRFLOW_ADMIN_PASSWORD:?set AIRFLOW_ADMIN_PASSWORD}"
: "${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?set AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE}"

echo "airflow-init: migrating the metadata database"
airflow db migrate

echo "airflow-init: writing the password of '${AIRFLOW_ADMIN_USERNAME}' to ${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE}"
python - <<'PY'
import json
import os
from pathlib import Path

path = Path(os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
path.parent.mkdir(parents=True, exist_ok=True)
passwords = json.loads(path.read_text() or "{}") if path.exists() else {}
passwords[os.environ["AIRFLOW_ADMIN_USERNAME"]] = os.environ["AIRFLOW_ADMIN_PASSWORD"]
# Readable and writable by the owner and group 0 only: the api-server opens it read-write.
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o660)
with os.fdopen(fd, "w") as handle:
    json.dump(passwords, handle)
os.chmod(path, 0o660)
PY
echo "airflow-init: done"
