"""Prefect flows: one per DVC stage. Importing this package sets defaults the tools need on a small,
offline machine, before Prefect or MLflow read their settings (a user's own values win)."""

import os

# Prefect's temporary API server takes over 20 s (its default limit) to start on a loaded 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# Telemetry would try the network; Prefect's also locks its SQLite database ("database is locked").
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
