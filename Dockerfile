# TorchServe image for the archived model, plus a `train` target for Vertex AI custom jobs.
#
#   docker build --build-arg MODEL_NAME=digits_cnn -t digits_cnn:1.0 .     # runtime (default target)
#   docker build --target train -t digits-train .                          # training image
#   python -m scripts.container build                                      # the same, names from the Hydra config
#
# Both stages start from Debian's own python3 so one Dockerfile works on the real base image and
# on the debootstrap stand-in that tests/test_container.py builds where no registry is reachable.
ARG BASE_IMAGE=debian:bookworm-slim

# ---- python: Debian's python3 (3.11 on bookworm), shared by every stage below.
FROM ${BASE_IMAGE} AS python
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && apt-get clean && rm -rf /var/lib/apt/lists/*

# ---- builder: a venv with the pinned serving dependencies only (no kornia/lightning: the
# TorchScript model carries its preprocessing; handlers/ imports torch, PIL, numpy, stdlib).
FROM python AS builder
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
# PIP_* stay unset unless the build passes them (a machine's own index, wheels, CA bundle).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG PIP_CONSTRAINT
# CPU-only torch; TORCH_INDEX_URL="" means pip's configured index (e.g. a local wheel).
ARG TORCH_VERSION=2.14.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
COPY requirements-serve.txt /tmp/
# torch's C++ headers and test binaries are not needed to serve (about 190 MB).
RUN /opt/venv/bin/pip install -r /tmp/requirements-serve.txt \
    && torch=$(/opt/venv/bin/python -c "import torch, os; print(os.path.dirname(torch.__file__))") \
    && rm -rf "$torch/include" "$torch/test" "$torch"/bin/test_* "$torch"/bin/*Test "$torch"/bin/protoc* \
    && /opt/venv/bin/python -c "import torch, ts, PIL, numpy, yaml, psutil; print('torch', torch.__version__)"

# ---- train: the project's packages for a Vertex AI custom job (cloud/vertex-job.yaml runs cloud/vertex.py).
# Not built by the tests (it installs requirements.txt, whose torch is PyPI's multi-GB CUDA build);
# tests/test_container.py checks that it copies every package the entrypoint imports.
FROM python AS train
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY requirements.txt /app/
RUN /opt/venv/bin/pip install --no-cache-dir -r /app/requirements.txt
# One COPY per package (a COPY of several folders would merge their contents).
COPY configs /app/configs
COPY common /app/common
COPY handlers /app/handlers
COPY training /app/training
COPY experiments /app/experiments
COPY servers /app/servers
COPY monitoring /app/monitoring
COPY cloud /app/cloud
COPY scripts /app/scripts
WORKDIR /app
# No .git in the image: the commit that the archive's lineage names comes from the build,
# `--build-arg GIT_COMMIT=$(git rev-parse HEAD)`; without it the archive stage refuses (archive.require_lineage).
ARG GIT_COMMIT=unknown
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 GIT_COMMIT=$GIT_COMMIT
ENTRYPOINT ["python", "-m", "scripts.vertex_train"]

# ---- models: the archive baked into the image. A build may replace this stage with a folder
# holding <MODEL_NAME>.mar: `--build-context models=DIR` (docker buildx, buildah).
FROM scratch AS models
ARG MODEL_NAME=digits_cnn
COPY model_store/${MODEL_NAME}.mar /

# ---- runtime, the default target (last stage): Java 17 headless JRE, python3, the venv, one archive.
FROM python AS runtime
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin model-server
COPY --from=builder /opt/venv /opt/venv
COPY docker/entrypoint.sh docker/config.properties docker/log4j2.xml metrics.yaml servers/drain.py /opt/ts/
ARG MODEL_NAME=digits_cnn
COPY --from=models ${MODEL_NAME}.mar /opt/ts/model-store/
ENV PATH=/opt/venv/bin:$PATH \
    MODEL_NAME=${MODEL_NAME} \
    MODEL_STORE=/opt/ts/model-store \
    PYTHONUNBUFFERED=1
USER model-server
WORKDIR /home/model-server
EXPOSE 8080
ENTRYPOINT ["/opt/ts/entrypoint.sh"]

