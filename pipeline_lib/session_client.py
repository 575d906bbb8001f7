"""Query the served session model: raw sessions so far in, top-k next item ids and scores out."""
from __future__ import annotations

from typing import Iterable, Mapping, Union

import numpy as np
import pandas as pd

from pipeline_lib.client import RecsysClient


class SessionClient(RecsysClient):
    """``RecsysClient`` for the session model: every raw column is a list (one session per row),
    sent as ``__values``/``__offsets``; the answer is ``item_ids`` and ``scores``, ``[sessions, k]``."""

    def recommend(self, sessions: Union[pd.DataFrame, Iterable[Mapping]]) -> tuple[np.ndarray, np.ndarray]:
        self._metadata()
        inputs = self.inputs_from_arrays(self.to_arrays(sessions))
        outputs = [self._tc.InferRequestedOutput(n) for n in ("item_ids", "scores")]
        result = self._client.infer(self.model_name, inputs, outputs=outputs)
        ids = np.asarray(result.as_numpy("item_ids"))
        if ids.dtype == object:  # string item ids travel as BYTES
            ids = np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else v, otypes=[object])(ids)
        return ids, np.asarray(result.as_numpy("scores"))
