"""MLflow tracking: runs per trial and sweep, metrics, artifacts, comparison queries."""
