import os

# No test may reach a model hub: a download attempt must fail loudly, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter):
    """A skipped PostgreSQL test is named in pytest's last line (the one CI shows), not only in the `-ra` list above
    it: "... 1 skipped, 1 NOT RUN: MLflow on PostgreSQL (no PostgreSQL server binaries ...) in 12.3s"."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "test_mlflow_postgres.py" in r.nodeid]
    if skipped:
        reason = _skip_reason(skipped[0]).split(":")[0].split(" (")[0]
        terminalreporter.stats[f"NOT RUN: MLflow on PostgreSQL ({reason})"] = skipped[:1]
