"""Rank 0's MLflow writes on a background thread: in order, all landed by close, errors not lost."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from orchestrator.tracking.background import BackgroundRunLogger
from orchestrator.tracking.mlflow_runs import find_or_create_run


@pytest.fixture
def run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = find_or_create_run(uri, "qat", "qat.trial_id", "t1", "trial", {})
    return uri, run_id


def test_writes_land_in_call_order_by_close(run):
    uri, run_id = run
    logger = BackgroundRunLogger(uri, run_id)
    logger.log_params({"qat.lr": "0.001"})
    for step in range(5):
        logger.log_metrics({"val_acc": 90.0 + step}, step=step)
    logger.set_tags({"qat.nodes": "n1"})
    assert logger.logged_steps("val_acc") == {0, 1, 2, 3, 4}  # waits for the writes queued before it
    logger.log_metrics({"test_acc": 99.0}, step=4)
    logger.close()
    got = MlflowClient(uri).get_run(run_id)
    assert got.data.params["qat.lr"] == "0.001" and got.data.tags["qat.nodes"] == "n1"
    assert got.data.metrics["test_acc"] == 99.0
    history = MlflowClient(uri).get_metric_history(run_id, "val_acc")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(s, 90.0 + s) for s in range(5)]
    stamps = [m.timestamp for m in sorted(history, key=lambda m: m.step)]
    assert stamps == sorted(stamps)  # taken when each call was made


def test_a_failed_write_is_raised_not_lost(run):
    uri, _ = run
    logger = BackgroundRunLogger(uri, "0" * 32)  # no such run: every write fails
    logger.log_metrics({"val_acc": 1.0}, step=0)
    with pytest.raises(Exception, match="0" * 32):
        logger.flush()
    logger.close(raise_errors=False)  # the error path: quiet, and the thread is gone


def test_the_next_call_raises_an_earlier_failure(run):
    uri, _ = run
    logger = BackgroundRunLogger(uri, "0" * 32)
    logger.log_metrics({"val_acc": 1.0}, step=0)
    with pytest.raises(Exception, match="0" * 32):
        logger.logged_steps("val_acc")  # answers only after the failed write before it
    with pytest.raises(Exception, match="0" * 32):
        logger.close()
