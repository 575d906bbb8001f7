# Triton image (GPU) serving the shared model repository. The repository's models use only the
# python backend (merlin-systems executor model running the workflow + SavedModel in-process), so
# the image needs the Merlin libraries and this project's pipeline_lib (the ensemble's ops are
# importable classes from pipeline_lib.export), not Triton's TensorFlow backend.
ARG MERLIN_IMAGE=nvcr.io/nvidia/merlin/merlin-tensorflow:23.08
FROM ${MERLIN_IMAGE}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline_lib ./pipeline_lib
COPY flows ./flows
RUN pip install --no-cache-dir --no-deps --ignore-requires-python -e .

EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --retries=20 CMD curl -fsS localhost:8000/v2/health/ready || exit 1
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=poll", \
     "--repository-poll-secs=15", "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"]
