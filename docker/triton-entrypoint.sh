#!/bin/sh
# Explicit model control: the pipeline worker switches versions with the model-repository API,
# which only answers requests carrying the admin key (inference, health and metrics stay open).
set -eu
KEY_ARGS=""
if [ -n "${RECSYS_ADMIN_KEY:-}" ]; then
  KEY_ARGS="--http-restricted-api=model-repository:recsys-admin-key=${RECSYS_ADMIN_KEY} --grpc-restricted-protocol=model-repository:recsys-admin-key=${RECSYS_ADMIN_KEY}"
fi
LOAD=""
[ -f /models/recsys/config.pbtxt ] && LOAD="--load-model=recsys"
# shellcheck disable=SC2086
exec tritonserver --model-repository=/models --model-control-mode=explicit $LOAD \
  --exit-on-error=false --http-port=8000 --grpc-port=8001 --metrics-port=8002 $KEY_ARGS "$@"
