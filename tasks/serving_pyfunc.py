"""The served model's code, logged with every candidate (MLflow "models from code").

MLflow executes this file when the model is loaded (`mlflow.pyfunc.load_model`, `mlflow models
serve`); requant itself never imports it. Logging code instead of a pickled object means loading a
promoted model runs only this reviewed file (pickled models run whatever they hold: CVE-2024-37052).
"""

import mlflow
from mlflow.pyfunc import PythonModel

try:  # where the model is served: tasks/serving.py ships beside this file (MLflow code_paths)
    from serving import TextClassifier, texts_of
except ImportError:  # inside the requant project
    from tasks.serving import TextClassifier, texts_of


class ServedTextClassifier(PythonModel):
    """`{"inputs": ["text", ...]}` in, one `{"label": ..., "score": ...}` per text out."""

    def load_context(self, context):
        artifacts = context.artifacts
        self.classifier = TextClassifier(artifacts["onnx_model"], artifacts["tokenizer"], artifacts["classifier_card"])

    def predict(self, context, model_input, params=None):
        return self.classifier.predict(texts_of(model_input))


mlflow.models.set_model(ServedTextClassifier())
