"""Triton python-backend model doing nothing: the floor of the python-backend serving path
(benchmarks/serving_peers.py). Its config.pbtxt has the served ensemble's inputs and output, so a
request carries the same tensors; it reads every input and answers one float32 per row (the
first numeric input's values, cast). Copied into the model's version folder as ``model.py``."""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from pipeline_lib.serving import bytes_tensor

bytes_tensor.install(pb_utils)  # the BYTES decoding the project's model.py uses


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.output = config["output"][0]["name"]

    def execute(self, requests):
        responses = []
        for request in requests:
            tensors = (pb_utils.get_input_tensor_by_name(request, name) for name in self.inputs)
            arrays = [t.as_numpy() for t in tensors if t is not None]
            first = next(a for a in arrays if a.dtype != object)
            score = first.reshape(len(first), -1)[:, :1].astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output, score)]))
        return responses
