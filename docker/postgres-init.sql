-- Runs once, when the postgres service initialises an empty data volume (docker-entrypoint-initdb.d).
-- POSTGRES_DB creates Airflow's database; MLflow's tracking/registry store and its basic-auth users get their own.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
