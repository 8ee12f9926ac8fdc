"""Revisions of the ledger schema, applied in order by Alembic (this file is not one)."""
