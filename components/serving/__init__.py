"""`rlhf serve`: any policy behind an OpenAI-compatible HTTP API (app.py), its requests decoded in
batches (engine.py). It serves the champion to users and local judges to tests and offline runs.

A model is named as everywhere in the pipeline (a local folder, a `gguf:` name, a hub id online;
components/models/lm.py) or by an MLflow model URI (`models:/rlhf-policy@champion`, `runs:/...`):
the transformers flavor stores the weights and config in the folder its MLmodel names as
`model_binary` ("model") and the tokenizer in components/tokenizer/; both are downloaded and joined
into one model folder.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

MLFLOW_SCHEMES = ("models:/", "runs:/")


def model_folder(name: str, workdir: str | Path | None = None) -> str:
    """A loadable model folder for `name`; MLflow URIs are downloaded into `workdir` (a temporary folder by default)."""
    if not name.startswith(MLFLOW_SCHEMES):
        return name
    import mlflow
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(name, dst_path=str(workdir or tempfile.mkdtemp(prefix="rlhf-serve-"))))
    flavor = Model.load(str(local / "MLmodel")).flavors.get("transformers")
    if flavor is None:
        raise ValueError(f"{name}: not a model of MLflow's transformers flavor")
    folder = local / flavor.get("model_binary", "model")
    tokenizer = local / "components" / "tokenizer"
    if tokenizer.is_dir():
        for item in tokenizer.iterdir():
            shutil.copy(item, folder / item.name)
    return str(folder)


def load(name: str, workdir: str | Path | None = None):
    """(model, tokenizer) for a model name or MLflow model URI, in eval mode."""
    from components.models import lm

    model, tokenizer = lm.load_policy(model_folder(name, workdir))
    return model.eval().requires_grad_(False), tokenizer


def serve(name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_name: str | None = None, max_batch: int = 16) -> None:
    """Load `name` and serve it until interrupted; clients ask for the model `served_name` (default `name`)."""
    import uvicorn

    from components.serving.app import create_app
    from components.serving.engine import Engine

    model, tokenizer = load(name)
    app = create_app(Engine(model, tokenizer, max_batch), served_name or name, api_key)
    uvicorn.run(app, host=host, port=port, log_level="warning")
