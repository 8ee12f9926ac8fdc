# Image for the Airflow services and the stand-ins in docker-compose.yml: the official Airflow
# image plus the project's pinned requirements (great_expectations, pandas, pyarrow, ...).
# The tag must match the apache-airflow pin in requirements.txt (tests/test_docker_compose.py checks).
FROM apache/airflow:3.3.2-python3.11

# Test and lint tools from requirements.txt that the running pipeline never imports.
ARG RETENTION_DEV_ONLY="pytest pytest-timeout hypothesis ruff"

# Great Expectations sends usage statistics unless told not to (at build time and at run time).
ENV GX_ANALYTICS_ENABLED=false

# Mount points of the named volumes (standin-state, retention-home): a fresh volume copies the
# owner and mode of its mount point, so any AIRFLOW_UID in group 0 can write to it.
USER root
RUN install -d -o airflow -g root -m 0775 /opt/airflow/standin-state /opt/airflow/retention-home
USER airflow

COPY --chown=airflow:root requirements.txt constraints.txt /opt/retention-requirements/

# Install the runtime requirements at the versions the project tests with (constraints.txt is the
# whole resolved tree). apache-airflow stays at the image's version: pip fails rather than
# replace it if requirements.txt asked for another one.
RUN set -eu; \
    dev_only="$(echo ${RETENTION_DEV_ONLY} | tr ' ' '|')"; \
    grep -viE "^(${dev_only})==" /opt/retention-requirements/requirements.txt \
        > /opt/retention-requirements/requirements-runtime.txt; \
    pip install --no-cache-dir \
        "apache-airflow==${AIRFLOW_VERSION}" \
        -r /opt/retention-requirements/requirements-runtime.txt \
        -c /opt/retention-requirements/constraints.txt; \
    python -c "import great_expectations, pandas, pyarrow, psycopg2, sqlalchemy, yaml"
