"""Prefect flows: they compose tasks and branch on their results, nothing more."""
