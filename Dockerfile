# Images for docker-compose.yml, two targets of one file:
#
# production  The Airflow services: the official Airflow image, the project's pinned runtime
#             requirements and the project installed as a package (not editable). This is the
#             image to deploy; no development tooling is in it. Neither are the DAGs and the
#             policy: docker-compose.yml mounts dags/ and include/.
# standins    The local stand-ins of Mailchimp and Zendesk and the synthetic CRM contacts:
#             production plus retention_dev/ and what the stand-ins import. Development only.
#
# The tag must match the apache-airflow pin in requirements.txt (tests/test_docker_compose.py
# checks); tests/test_production_install.py makes the same install as the production target in a
# virtualenv and checks that the DAGs load from it.
FROM apache/airflow:3.3.2-python3.11 AS production

# Great Expectations sends usage statistics unless told not to (at build time and at run time).
ENV GX_ANALYTICS_ENABLED=false

# Mount points of the named volumes (standin-state, retention-home): a fresh volume copies the
# owner and mode of its mount point, so any AIRFLOW_UID in group 0 can write to it. /opt/retention
# holds the requirement files, and the source tree while pip builds the package in it.
USER root
RUN install -d -o airflow -g root -m 0775 /opt/airflow/standin-state /opt/airflow/retention-home /opt/retention
USER airflow

# The runtime requirements at the versions the project tests with (constraints.txt is the whole
# resolved tree), in a layer of their own: a change to the code does not reinstall them.
# apache-airflow stays at the image's version: pip fails rather than replace it if
# requirements.txt asked for another one.
COPY --chown=airflow:root requirements.txt constraints.txt /opt/retention/
RUN pip install --no-cache-dir \
        "apache-airflow==${AIRFLOW_VERSION}" \
        -r /opt/retention/requirements.txt \
        -c /opt/retention/constraints.txt

# The project itself, as a regular install: the `retention` command and the provider entry point
# that registers the connection types. --no-deps: the requirements are installed above, pinned.
# pyproject.toml reads the dependencies from requirements.txt (already in /opt/retention).
# The source copy is removed once installed, so that only the installed package can be imported.
COPY --chown=airflow:root pyproject.toml README.md /opt/retention/
COPY --chown=airflow:root src/ /opt/retention/src/
RUN set -eu; \
    pip install --no-cache-dir --no-deps /opt/retention; \
    rm -rf /opt/retention/src /opt/retention/build; \
    cd /tmp && python -c "import great_expectations, pandas, pyarrow, psycopg2, sqlalchemy, yaml, retention.cli"; \
    retention --help >/dev/null


FROM production AS standins

# Only what the stand-ins and the synthetic data import beyond the runtime requirements (the
# development requirements also hold the test tools and a Compose binary, none of which runs here).
COPY --chown=airflow:root docker/standins-requirements.txt /opt/retention/
RUN pip install --no-cache-dir \
        "apache-airflow==${AIRFLOW_VERSION}" \
        -r /opt/retention/standins-requirements.txt \
        -c /opt/retention/constraints.txt

# `python -m retention_dev.standins.mailchimp` and `retention_dev.synthetic.crm` (seeding the demo CRM).
COPY --chown=airflow:root retention_dev/__init__.py /opt/retention/retention_dev/__init__.py
COPY --chown=airflow:root retention_dev/standins/ /opt/retention/retention_dev/standins/
COPY --chown=airflow:root retention_dev/synthetic/ /opt/retention/retention_dev/synthetic/
ENV PYTHONPATH=/opt/retention
