"""nodewise: put a registered MLflow model into production, from one machine to a fleet."""

__version__ = "0.1.0"
