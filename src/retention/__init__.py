"""Retention enforcement for the IIS privacy notice: policy, rule engine, connectors, ledger."""
