"""Triton python-backend model that runs a TensorFlow SavedModel's serving signature: the stand-in
for Triton's TensorFlow backend in the stock merlin-systems peer (benchmarks/serving_peers.py). The
CPU tritonserver here has no TensorFlow backend, so ``Ensemble.export``'s ``backend: "tensorflow"``
model gets this file and ``backend: "python"``; everything else of the stock export is unchanged.
Copied into the model's version folder as ``model.py``; only runs inside Triton's python backend."""
import json
from pathlib import Path

import numpy as np
import tensorflow as tf
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / str(args["model_version"]) / "model.savedmodel"
        self.signature = tf.saved_model.load(str(path)).signatures["serving_default"]
        self.input_dtypes = {k: v.dtype for k, v in self.signature.structured_input_signature[1].items()}
        self.outputs = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = {name: tf.convert_to_tensor(pb_utils.get_input_tensor_by_name(request, name).as_numpy(), dtype=dtype)
                      for name, dtype in self.input_dtypes.items()}
            result = self.signature(**inputs)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, np.asarray(result[name].numpy(), dtype=dtype)) for name, dtype in self.outputs.items()]))
        return responses
