# Triton image (GPU) serving the shared model repository. The repository's models use only the
# python backend (the merlin-systems executor model runs the NVTabular workflow and the SavedModel
# in-process), so the image needs the Merlin libraries -- all in NVIDIA's Merlin image -- and this
# project's pipeline_lib (the ensemble's ops are classes in pipeline_lib.export.ranking), not Triton's
# TensorFlow backend. Same base image as the worker: the pickled workflow/ensemble need the same
# package versions and Python minor version as the process that exported them.
ARG MERLIN_IMAGE=nvcr.io/nvidia/merlin/merlin-tensorflow:23.08
FROM ${MERLIN_IMAGE}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline_lib ./pipeline_lib
COPY flows ./flows
RUN pip install --no-cache-dir --no-deps --ignore-requires-python -e .
# ANN top-k (pipeline_lib/export/ann.py, docs/ann.md): faiss-gpu in the GPU image when the base image lacks faiss
# (its CPU IVF-Flat code reads and searches the topk/items.faiss written by faiss-cpu 1.8.0 at export)
RUN python -c "import faiss" 2>/dev/null || pip install --no-cache-dir "faiss-gpu==1.7.2"
# the ranking model compiled to ONNX at export (export.compiled_model, pipeline_lib/export/compiled_model.py)
RUN pip install --no-cache-dir "onnxruntime>=1.17,<2"
COPY docker/triton-entrypoint.sh /usr/local/bin/triton-entrypoint.sh

EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --retries=20 CMD curl -fsS localhost:8000/v2/health/live || exit 1
ENTRYPOINT ["/usr/local/bin/triton-entrypoint.sh"]
