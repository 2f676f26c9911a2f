"""The served text-generation model's code, logged with every decoder candidate (MLflow "models from code").

MLflow executes this file when the model is loaded (`mlflow.pyfunc.load_model`, `mlflow models
serve`); requant itself never imports it. It is the decoder counterpart of serving_pyfunc.py: the
model holds the ONNX decoder (artifact `onnx_model`), its tokenizer (`tokenizer`) and the generator
card (`generator_card`), and ships generation.py and batching.py as code (MLflow `code_paths`).

`predict` carries type hints, so MLflow takes `{"inputs": ["prompt", ...]}` as a list of strings
without building a DataFrame per request, and answers one generated text per prompt. `params` may
carry `max_new_tokens` and `ignore_eos`; MLflow passes params only when the logged signature
declares them (log the model with `input_example=(["prompt"], {"max_new_tokens": 32, "ignore_eos": False})`).
Bad input becomes HTTP 400 with a message, a full queue HTTP 503 (MLflow's scoring server maps
these error codes to those statuses).
"""

from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.pyfunc import PythonModel

try:  # where the model is served: tasks/serve/generation.py ships beside this file (MLflow code_paths)
    from generation import BadRequest, QueueFull, TextGenerator
except ImportError:  # inside the requant project
    from tasks.serve.generation import BadRequest, QueueFull, TextGenerator


class ServedTextGenerator(PythonModel):
    """`{"inputs": ["prompt", ...], "params": {"max_new_tokens": n}}` in, one generated text per prompt out."""

    def load_context(self, context):
        artifacts = context.artifacts
        self.generator = TextGenerator(artifacts["onnx_model"], artifacts["tokenizer"], artifacts["generator_card"])

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        try:
            params = params or {}
            return self.generator.generate(model_input, params.get("max_new_tokens"), params.get("ignore_eos", False))
        except BadRequest as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        except QueueFull as exc:
            raise MlflowException(str(exc), error_code=TEMPORARILY_UNAVAILABLE) from None


mlflow.models.set_model(ServedTextGenerator())
