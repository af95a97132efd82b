# The service's image: Airflow 3.3 (the official image) with the project installed.
# Every Airflow container of docker-compose.yaml and the model server (`serving`) run it.
#
#   docker build -t mlops-retraining .
#
# Dependencies come only from requirements.lock (the same versions as the virtual environment); the project itself
# is installed with --no-deps. Nothing is pip-installed at container start.
FROM apache/airflow:3.3.2-python3.11

USER root
# Folders backed by named volumes in docker-compose.yaml. Docker copies an image folder's ownership into a fresh named
# volume, so these make the volumes writable by the airflow user (and group 0, for arbitrary AIRFLOW_UID).
RUN mkdir -p /opt/mlops/src /opt/mlops/datastore /opt/airflow/auth \
    && chown -R airflow:0 /opt/mlops /opt/airflow/auth \
    && chmod -R g+rwX /opt/mlops /opt/airflow/auth
USER airflow

COPY --chown=airflow:0 requirements.lock /opt/mlops/src/requirements.lock
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /opt/mlops/src/requirements.lock

COPY --chown=airflow:0 pyproject.toml README.md /opt/mlops/src/
COPY --chown=airflow:0 ml /opt/mlops/src/ml
RUN pip install --no-cache-dir --no-deps /opt/mlops/src

COPY --chown=airflow:0 docker /opt/mlops/src/docker
COPY --chown=airflow:0 dags /opt/airflow/dags

ENV MLOPS_DATA_STORE=/opt/mlops/datastore
