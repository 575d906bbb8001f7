"""The workflows' LambdaOp functions live in etl/lambda_ops.py (below the modules that use them, so the
compiled transform needs no import of the workflow modules: no import cycle)."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd

from pipeline_lib.etl import fast_transform, lambda_ops, sessions, workflow


def test_old_names_are_the_same_functions_so_old_pickles_load_and_compile():
    # workflows pickled before the move refer to etl.workflow.to_float32 / etl.sessions.time_deltas
    assert workflow.to_float32 is lambda_ops.to_float32
    assert sessions.time_deltas is lambda_ops.time_deltas
    for module, name in (("workflow", "to_float32"), ("sessions", "time_deltas")):
        old = f"cpipeline_lib.etl.{module}\n{name}\n.".encode()  # a pickled reference by module and name
        assert pickle.loads(old) is getattr(fast_transform, name)  # what the compiled transform recognises


def test_values():
    assert workflow.to_float32(pd.Series([1.5, 2.0], dtype="float64")).dtype == np.float32
    got = lambda_ops.time_deltas(pd.Series([[10, 11, 11 + np.e - 1], []]))
    np.testing.assert_allclose(got[0], [0.0, np.log(2), 1.0], rtol=1e-6)
    assert got[0].dtype == np.float32 and len(got[1]) == 0
