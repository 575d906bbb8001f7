# Pipeline worker image (GPU): NVIDIA's Merlin TensorFlow image already holds cudf, dask-cuda,
# NVTabular, Merlin Models/Systems and tritonserver built for CUDA. We add this project and the
# orchestration stack, and run the Prefect worker that executes scheduled pipeline runs.
# The ETL selects the GPU path (cudf + LocalCUDACluster) automatically when a GPU is visible.
ARG MERLIN_IMAGE=nvcr.io/nvidia/merlin/merlin-tensorflow:23.08
FROM ${MERLIN_IMAGE}

WORKDIR /app
ENV PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    PREFECT_LOGGING_EXTRA_LOGGERS=pipeline_lib \
    TRITONSERVER_BIN=/opt/tritonserver/bin/tritonserver \
    TRITON_BACKEND_DIR=/opt/tritonserver/backends

COPY pyproject.toml README.md ./
COPY pipeline_lib ./pipeline_lib
COPY flows ./flows
COPY configs ./configs
COPY prefect.yaml ./
# ANN top-k (pipeline_lib/export/ann.py, docs/ann.md): faiss-gpu in the GPU image when the base image lacks faiss
# (its CPU IVF-Flat code reads and searches the topk/items.faiss written by faiss-cpu 1.8.0 at export)
RUN python -c "import faiss" 2>/dev/null || pip install --no-cache-dir "faiss-gpu==1.7.2"
# The Merlin stack comes from the base image; only the orchestration/CLI layer is added.
RUN pip install --no-cache-dir "prefect>=3.7,<3.8" "sqlalchemy>=2.0.30,<2.1" "fastapi<0.116" "pydantic>=2.7,<3" "typer>=0.12" \
        "scikit-learn>=1.3,<1.6" "matplotlib>=3.7,<3.10" "tritonclient[grpc,http]" \
        "onnxruntime>=1.17,<2" "tf2onnx>=1.16,<2" \
 && pip install --no-cache-dir --no-deps --ignore-requires-python -e .

HEALTHCHECK --interval=30s --timeout=5s --retries=5 CMD python -c "import pipeline_lib, flows" || exit 1
CMD ["prefect", "worker", "start", "--pool", "recsys-gpu", "--type", "process"]
