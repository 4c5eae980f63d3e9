-- One database per service of the team setup (docker-compose.yml). The postgres image runs this
-- once, on its first start with an empty data volume, as $POSTGRES_USER (who owns them).
-- tests/deploy/test_compose.py runs this file with psql against a real PostgreSQL server.
CREATE DATABASE mlflow;   -- MLflow's tracking store (experiments, runs, params, metrics)
CREATE DATABASE optuna;   -- Optuna's RDB storage: the sweeps' studies, read by optuna-dashboard
CREATE DATABASE moeplat;  -- the job server's queue (moeplat.server.jobs)
