"""The MLflow pyfunc wrapper of a saved generator, logged as code (no pickled object).

``mlflow.pyfunc.load_model(uri).predict({"n": 4, "seed": 1, "label": "consolidation"})`` returns uint8
images ``(n, H, W)``; the same seed gives the same images.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

from sonogen.generators import load_generator, to_uint8


class GeneratorModel(PythonModel):
    # requests are plain dicts on purpose: mlflow's type hints cannot describe an optional condition, and a warnings
    # filter cannot silence its warning (mlflow resets the filters around the check)
    _skip_type_hint_validation = True

    def load_context(self, context):
        self.generator = load_generator(context.artifacts["generator"])

    def predict(self, context, model_input, params=None):
        request = model_input.iloc[0].to_dict() if hasattr(model_input, "iloc") else dict(model_input)
        condition = dict(request.get("condition") or {})
        if "label" in request:
            condition["label"] = request["label"]
        return to_uint8(self.generator.sample(int(request.get("n", 1)), int(request.get("seed", 0)), condition))


mlflow.models.set_model(GeneratorModel())
