"""The MLflow Model Registry: a sweep's best trial as a new version of a registered model.

The version is an MLflow ONNX model (``mlflow.onnx``: the float graph every encoding names a
tensor of, loadable with ``mlflow.pyfunc``) logged to the trial's run under ``model/``, with
the trial's encodings (``.encodings`` and ``.encodings.json``) and ``.pth`` weights beside it,
so ``models:/<name>/<version>`` downloads everything a deployment needs.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .mlflow_runs import client, retrying

MODEL_ARTIFACT = "model"


def register_trial_model(uri: str, run_id: str, name: str, prefix: str, tags: dict[str, str],
                         description: str) -> str:
    """Log run ``run_id``'s export as an MLflow model and register it as a version of ``name``;
    returns the version number."""
    import mlflow.onnx
    import onnx

    c = client(uri)
    with tempfile.TemporaryDirectory(prefix="qat-register-") as tmp:
        export = Path(retrying(lambda: c.download_artifacts(run_id, "export", tmp)))
        model_dir = Path(tmp) / MODEL_ARTIFACT
        mlflow.onnx.save_model(onnx.load(str(export / f"{prefix}.onnx")), str(model_dir),
                               pip_requirements=["onnx", "onnxruntime"], metadata=dict(tags))
        for suffix in (".encodings", ".encodings.json", ".pth"):
            source = export / f"{prefix}{suffix}"
            if source.is_file():
                shutil.copy2(source, model_dir / source.name)
        retrying(lambda: c.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT))
    try:
        retrying(lambda: c.create_registered_model(name, description="QAT sweeps' best models (qat-orchestrator)"))
    except Exception as exc:  # RESOURCE_ALREADY_EXISTS: a new version of an existing model
        if "already exists" not in str(exc).lower():
            raise
    version = retrying(lambda: c.create_model_version(name, source=f"runs:/{run_id}/{MODEL_ARTIFACT}",
                                                      run_id=run_id, tags=tags, description=description))
    return str(version.version)
