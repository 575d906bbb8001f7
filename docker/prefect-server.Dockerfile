# Prefect server (API + UI + scheduler) for docker-compose.yml, on PostgreSQL.
# The official image with SQLAlchemy held below 2.1: with SQLAlchemy 2.1 every cycle of Prefect 3.7's
# scheduler service fails ("Can't evaluate bulk DML statement" in _insert_scheduled_flow_runs), so cron
# deployments never get a run. The same pin is in pyproject.toml / uv.lock for the local server.
ARG PREFECT_IMAGE=prefecthq/prefect:3.7.2-python3.11
FROM ${PREFECT_IMAGE}
RUN pip install --no-cache-dir "sqlalchemy>=2.0.30,<2.1" "fastapi<0.116" \
 && python -c "import sqlalchemy; v = tuple(map(int, sqlalchemy.__version__.split('.')[:2])); assert v < (2, 1), v"
