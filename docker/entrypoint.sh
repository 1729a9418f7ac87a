#!/bin/sh
# Container entrypoint: drain.py (servers/drain.py) becomes PID 1 (exec) and runs TorchServe's Java
# frontend in the foreground as its child. SIGTERM from the engine or Cloud Run reaches drain.py,
# which waits until every request already accepted is answered (at most 6 s), then passes SIGTERM
# on: the frontend's shutdown hook closes the ports and stops the Python workers, and the container
# exits when the server does. (Java's own hook alone drops the requests in flight.) `torchserve
# --start --foreground` is not used: it keeps a Python parent that dies on SIGTERM and orphans Java.
#
# Before that, pick_profile.py picks the serving profile (gpu where a GPU is visible, else cpu; SERVE_PROFILE
# forces one), unpacks the archive into this run's model store with that profile's TorchServe settings
# (rendered from configs/serve/ at build time into $TS_DIR/serve/) and says so in one line.
#
# Environment: MODEL_NAME (baked in at build), MODEL_STORE, PORT (Cloud Run sets it; inference on
# BIND, 0.0.0.0), MANAGEMENT_PORT, METRICS_PORT, GRPC_INFERENCE_PORT, GRPC_MANAGEMENT_PORT, WORKER_PORT
# (loopback), SERVE_PROFILE (auto, cpu, gpu), JAVA_OPTS (extra JVM flags), TS_DIR (this file's folder in
# the image, /opt/ts). Defaults: docker/config.properties.
set -eu

: "${TS_DIR:=/opt/ts}"
: "${MODEL_NAME:?set MODEL_NAME to the archive to serve (MODEL_STORE/MODEL_NAME.mar)}"
: "${MODEL_STORE:=$TS_DIR/model-store}"
if [ ! -f "$MODEL_STORE/$MODEL_NAME.mar" ]; then
    echo "entrypoint: error: no archive $MODEL_STORE/$MODEL_NAME.mar (bake it in with --build-arg MODEL_NAME or mount a model store)" >&2
    exit 2
fi

run_dir=$(mktemp -d)
config="$run_dir/config.properties"
{
    cat "$TS_DIR/config.properties"
    echo
    # Later keys win in a Java properties file.
    echo "metrics_config=$TS_DIR/metrics.yaml"
    [ -z "${PORT:-}" ] || echo "inference_address=http://${BIND:-0.0.0.0}:$PORT"
    [ -z "${MANAGEMENT_PORT:-}" ] || echo "management_address=http://127.0.0.1:$MANAGEMENT_PORT"
    [ -z "${METRICS_PORT:-}" ] || echo "metrics_address=http://127.0.0.1:$METRICS_PORT"
    [ -z "${GRPC_INFERENCE_PORT:-}" ] || echo "grpc_inference_port=$GRPC_INFERENCE_PORT"
    [ -z "${GRPC_MANAGEMENT_PORT:-}" ] || echo "grpc_management_port=$GRPC_MANAGEMENT_PORT"
    [ -z "${WORKER_PORT:-}" ] || echo "initial_worker_port=$WORKER_PORT"
    echo "model_store=$run_dir/model-store"
} > "$config"
python "$TS_DIR/pick_profile.py" "$MODEL_STORE/$MODEL_NAME.mar" "$run_dir/model-store/$MODEL_NAME" \
    --settings "$TS_DIR/serve" --properties "$config"
# TorchServe counts the GPUs with nvidia-smi unless CUDA_VISIBLE_DEVICES names them, and uses no more than that:
# where only the device nodes show them, name them.
gpus=$(sed -n 's/^number_of_gpu=//p' "$config" | tail -n 1)
if [ "$gpus" -gt 0 ] && [ -z "${CUDA_VISIBLE_DEVICES+set}" ] && ! nvidia-smi -L > /dev/null 2>&1; then
    CUDA_VISIBLE_DEVICES=$(seq -s , 0 $((gpus - 1)))
    export CUDA_VISIBLE_DEVICES
fi

address() { sed -n "s/^$1=//p" "$config" | tail -n 1; }
echo "entrypoint: serving $MODEL_NAME from $MODEL_STORE/$MODEL_NAME.mar: inference $(address inference_address)," \
    "management $(address management_address), metrics $(address metrics_address)"
echo "entrypoint: token authorization is DISABLED in this container: Cloud Run IAM authenticates" \
    "callers (deploy with --no-allow-unauthenticated); never publish $(address inference_address) without such a gate"

ts_home=$(python -c 'import os, ts; print(os.path.dirname(os.path.dirname(ts.__file__)))')
metrics_url="http://127.0.0.1:$(address metrics_address | sed 's/.*://')/metrics"
# shellcheck disable=SC2086  # JAVA_OPTS is a list of flags
exec python "$TS_DIR/drain.py" --metrics "$metrics_url" -- java -Dmodel_server_home="$ts_home" -Djava.io.tmpdir="$run_dir" \
    -Dlog4j.configurationFile="file://$TS_DIR/log4j2.xml" ${JAVA_OPTS:-} \
    -cp ".:$ts_home/ts/frontend/*" org.pytorch.serve.ModelServer \
    --python "$(command -v python)" -f "$config" -s "$run_dir/model-store" \
    -m "$MODEL_NAME=$MODEL_NAME" -ncs
