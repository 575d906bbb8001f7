#!/bin/sh
# Explicit model control: the pipeline worker switches versions with the model-repository API,
# which only answers requests carrying the admin key (inference, health and metrics stay open).
# One header name over HTTP and gRPC: triton-grpc-protocol-recsys-admin-key (Triton prefixes gRPC
# metadata with triton-grpc-protocol-). Here the key is in argv, visible inside the container only.
set -eu
KEY_ARGS=""
if [ -n "${RECSYS_ADMIN_KEY:-}" ]; then
  KEY_ARGS="--http-restricted-api=model-repository:triton-grpc-protocol-recsys-admin-key=${RECSYS_ADMIN_KEY} --grpc-restricted-protocol=model-repository:recsys-admin-key=${RECSYS_ADMIN_KEY}"
fi
LOAD=""
[ -f /models/recsys/config.pbtxt ] && LOAD="--load-model=recsys"
# shellcheck disable=SC2086
exec tritonserver --model-repository=/models --model-control-mode=explicit $LOAD \
  --exit-on-error=false --http-port=8000 --grpc-port=8001 --metrics-port=8002 $KEY_ARGS "$@"
