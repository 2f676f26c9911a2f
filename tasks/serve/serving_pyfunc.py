"""The served model's code, logged with every candidate (MLflow "models from code").

MLflow executes this file when the model is loaded (`mlflow.pyfunc.load_model`, `mlflow models
serve`); requant itself never imports it. Logging code instead of a pickled object means loading a
promoted model runs only this reviewed file (pickled models run whatever they hold: CVE-2024-37052).

`predict` carries type hints, so MLflow takes `{"inputs": ["text", ...]}` as a list of strings
without building a DataFrame per request. Bad input becomes HTTP 400 with a message, a full queue
HTTP 503 (MLflow's scoring server maps these error codes to those statuses).
"""

from typing import Any

import mlflow
import pydantic
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.pyfunc import PythonModel

try:  # where the model is served: tasks/serve/serving.py ships beside this file (MLflow code_paths)
    from serving import BadRequest, QueueFull, TextClassifier, texts_of
except ImportError:  # inside the requant project
    from tasks.serve.serving import BadRequest, QueueFull, TextClassifier, texts_of


class Prediction(pydantic.BaseModel):
    """The shape of one answer, for the signature MLflow infers (the answers are plain dicts of this shape)."""

    label: str
    score: float


class ServedTextClassifier(PythonModel):
    """`{"inputs": ["text", ...]}` in, one `{"label": ..., "score": ...}` per text out."""

    def load_context(self, context):
        artifacts = context.artifacts
        self.classifier = TextClassifier(artifacts["onnx_model"], artifacts["tokenizer"], artifacts["classifier_card"])

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[Prediction]:
        try:
            return self.classifier.classify(texts_of(model_input))
        except BadRequest as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        except QueueFull as exc:
            raise MlflowException(str(exc), error_code=TEMPORARILY_UNAVAILABLE) from None


mlflow.models.set_model(ServedTextClassifier())
