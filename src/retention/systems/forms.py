"""The connection forms of the project's three connection types, as data.

Airflow 3.3's UI builds a connection form from the provider metadata alone (``conn-fields`` and
``ui-field-behaviour`` of each ``connection-types`` entry), read without importing the hooks;
``retention.airflow.provider`` registers these, and each hook reads its own (the deprecated
``get_ui_field_behaviour()`` included). Light on purpose: the providers manager imports this
in every Airflow process that discovers providers.
"""

from __future__ import annotations

from typing import Any

MAILCHIMP_MAX_CONNECTIONS = 10  # Mailchimp's limit of simultaneous connections per user
ZENDESK_MAX_JOBS = 30  # Zendesk's limit of queued or running background jobs per account
CRM_CHUNK_SIZE = 50_000
CRM_ERASE_CONNECTIONS = 2  # transactions side by side per erase call (PostgreSQL)


def conn_field(label: str, kind: str = "string", *, default: Any = None, description: str | None = None,
               secret: bool = False, items: str | None = None) -> dict[str, Any]:
    """One ``conn-fields`` entry: an optional field of JSON type ``kind`` (an array's of ``items``)."""
    schema: dict[str, Any] = {"type": [kind, "null"]}
    if items is not None:
        schema["items"] = {"type": items}
    if default is not None:
        schema["default"] = default
    if secret:
        schema["format"] = "password"
    field: dict[str, Any] = {"label": label, "schema": schema}
    if description:
        field["description"] = description
    return field


# connection type -> hook class, name, extra fields, and which standard fields it hides or renames.
FORMS: dict[str, dict[str, Any]] = {
    "retention_mailchimp": {
        "hook-class-name": "retention.systems.newsletter.hook.MailchimpHook",
        "hook-name": "Mailchimp Marketing",
        "conn-fields": {
            "list_id": conn_field("Audience (list) id", description="The audience whose members the policy covers."),
            "list_ids": conn_field(
                "Audience (list) ids", "array", items="string",
                description="Instead of list_id, several audiences, each enforced. Keep the one list_id named first: "
                "its members keep their record ids (and holds); add the others after it.",
            ),
            "max_connections": conn_field(
                "Simultaneous connections", "integer", default=MAILCHIMP_MAX_CONNECTIONS,
                description="Mailchimp allows 10 per user.",
            ),
        },
        "ui-field-behaviour": {
            "hidden-fields": ["schema", "port", "login"],
            "relabeling": {"password": "API key", "host": "Base URL (optional)"},
            "placeholders": {
                "host": "https://us21.api.mailchimp.com/3.0 (default: from the key's data centre)",
                "extra": '{"list_id": "a1b2c3d4e5", "max_connections": 10}',
            },
        },
    },
    "retention_zendesk": {
        "hook-class-name": "retention.systems.ticketing.hook.ZendeskHook",
        "hook-name": "Zendesk Support",
        "conn-fields": {
            "requests_per_minute": conn_field(
                "Requests per minute", "integer", default=700, description="The account's API limit (by plan)."
            ),
            "max_jobs_in_flight": conn_field(
                "Background jobs at a time", "integer", default=ZENDESK_MAX_JOBS,
                description="At most 30 per account; lower it where other integrations run jobs too.",
            ),
            "oauth_token": conn_field("OAuth token", secret=True, description="Instead of the agent e-mail and API token."),
        },
        "ui-field-behaviour": {
            "hidden-fields": ["schema"],
            "relabeling": {"login": "Agent e-mail", "password": "API token", "host": "Subdomain or base URL"},
            "placeholders": {
                "host": "acme (or https://acme.zendesk.com)",
                "extra": '{"requests_per_minute": 700, "incremental_per_minute": 10}',
            },
        },
    },
    "retention_crm": {
        "hook-class-name": "retention.systems.crm.hook.CrmHook",
        "hook-name": "CRM (retention)",
        "conn-fields": {
            "mapping": conn_field(
                "Table/column mapping", description="YAML file (e.g. include/crm_mapping.yaml); default: the reference schema."
            ),
            "sqlalchemy_url": conn_field(
                "SQLAlchemy URL", secret=True, description="Overrides host, login, password, port and database."
            ),
            "chunk_size": conn_field("Rows per frame", "integer", default=CRM_CHUNK_SIZE),
            "erase_connections": conn_field(
                "Erase connections", "integer", default=CRM_ERASE_CONNECTIONS,
                description="Transactions side by side per erase batch, each its own part of it (PostgreSQL; 1: one).",
            ),
        },
        "ui-field-behaviour": {
            "hidden-fields": [],
            "relabeling": {"schema": "Database"},
            "placeholders": {
                "extra": '{"sqlalchemy_url": "postgresql+psycopg2://...", "mapping": "include/crm_mapping.yaml", "chunk_size": 50000}',
            },
        },
    },
}


def connection_types() -> list[dict[str, Any]]:
    """The provider metadata's ``connection-types`` entries."""
    return [{"connection-type": conn_type, **form} for conn_type, form in FORMS.items()]


def ui_field_behaviour(conn_type: str) -> dict[str, Any]:
    """A form's behaviour in the shape of the hooks' (deprecated) ``get_ui_field_behaviour()``."""
    b = FORMS[conn_type]["ui-field-behaviour"]
    return {"hidden_fields": list(b["hidden-fields"]), "relabeling": dict(b["relabeling"]), "placeholders": dict(b["placeholders"])}
