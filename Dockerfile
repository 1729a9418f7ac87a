# TorchServe images for the archived model (CPU and GPU), plus a `train` target for Vertex AI custom jobs.
#
#   docker build --build-arg MODEL_NAME=digits_cnn -t digits_cnn:1.0 .     # runtime, CPU (default target)
#   docker build --target gpu -t digits_cnn-gpu:1.0 .                      # runtime with CUDA torch
#   docker build --target train -t digits-train .                          # training image
#   python -m scripts.container build [--gpu]                              # the same, names from the Hydra config
#
# Every stage starts from Debian's own python3 so one Dockerfile works on the real base image and
# on the debootstrap stand-in that tests/test_container.py builds where no registry is reachable.
# The GPU image needs no CUDA base image: torch's CUDA wheels bring the CUDA runtime libraries
# (nvidia-* packages) and the NVIDIA container runtime mounts the host's driver.
ARG BASE_IMAGE=debian:bookworm-slim
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG MODEL_NAME=digits_cnn

# ---- python: Debian's python3 (3.11 on bookworm), shared by every stage below.
FROM ${BASE_IMAGE} AS python
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && apt-get clean && rm -rf /var/lib/apt/lists/*

# ---- venv: an empty venv and the pip settings of the build (PIP_* stay unset unless the build
# passes them: a machine's own index, wheels, CA bundle). Each stage below that runs pip declares them.
FROM python AS venv
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# ---- builder: the serving venv with CPU-only torch, then the pinned serving dependencies only (no
# kornia/lightning: the TorchScript model carries its preprocessing; handlers/ imports torch, PIL, numpy, stdlib).
FROM venv AS builder
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG PIP_CONSTRAINT
ARG TORCH_VERSION
# TORCH_INDEX_URL="" means pip's configured index (e.g. a local wheel).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
COPY requirements-serve.txt docker/finish-venv.sh /tmp/
RUN /tmp/finish-venv.sh

# ---- builder-gpu: the same venv with CUDA torch. "" (the default) is pip's index: PyPI's Linux x86_64 torch is
# the CUDA build (CUDA 13.0 at 2.14.1, which needs an NVIDIA driver >= 580); a cuXXX index of
# download.pytorch.org picks another CUDA, e.g. one that an older driver runs.
FROM venv AS builder-gpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG PIP_CONSTRAINT
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ARG GPU_TORCH_INDEX_URL=
# torchvision: nvJPEG, which decodes a GPU worker's JPEG batches on the GPU (handlers/decode.py)
RUN /opt/venv/bin/pip install ${GPU_TORCH_INDEX_URL:+--index-url "$GPU_TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
    "torchvision==${TORCHVISION_VERSION}"
COPY requirements-serve.txt docker/finish-venv.sh /tmp/
RUN /tmp/finish-venv.sh --cuda

# ---- settings: TorchServe's settings of each serving profile (configs/serve/<profile>.yaml), rendered by the
# archive's own code (docker/settings.py); the entrypoint applies one at start (docker/pick_profile.py).
FROM venv AS settings
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG PIP_CONSTRAINT
COPY requirements.txt /tmp/
# at requirements.txt's pins (not as a constraints file: pip refuses one whose lines have extras)
RUN grep -E '^(hydra-core|pyyaml)==' /tmp/requirements.txt | cut -d' ' -f1 > /tmp/settings-pins.txt \
    && /opt/venv/bin/pip install -r /tmp/settings-pins.txt
# What docker/settings.py imports (tests/test_container.py checks the list).
COPY common /src/common
COPY configs /src/configs
COPY handlers /src/handlers
COPY docker/settings.py /src/docker/
RUN PYTHONPATH=/src /opt/venv/bin/python /src/docker/settings.py /settings

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
ARG MODEL_NAME
COPY model_store/${MODEL_NAME}.mar /

# ---- ts: what both serving images hold in /opt/ts: the entrypoint and its files, the profiles, one archive.
FROM scratch AS ts
COPY docker/entrypoint.sh docker/pick_profile.py docker/config.properties docker/log4j2.xml metrics.yaml servers/drain.py /opt/ts/
COPY --from=settings /settings /opt/ts/serve/
ARG MODEL_NAME
COPY --from=models ${MODEL_NAME}.mar /opt/ts/model-store/

# ---- serving: what both serving images share: Java 17 headless JRE, python3, the user, the entrypoint.
FROM python AS serving
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin model-server
ARG MODEL_NAME
ENV PATH=/opt/venv/bin:$PATH \
    MODEL_NAME=${MODEL_NAME} \
    MODEL_STORE=/opt/ts/model-store \
    PYTHONUNBUFFERED=1
USER model-server
WORKDIR /home/model-server
EXPOSE 8080
ENTRYPOINT ["/opt/ts/entrypoint.sh"]

# ---- gpu: the serving image with CUDA torch. The variables are the ones NVIDIA's CUDA images set: the NVIDIA
# container runtime reads NVIDIA_*, and Kubernetes' GPU plugins mount the driver under /usr/local/nvidia.
FROM serving AS gpu
COPY --from=builder-gpu /opt/venv /opt/venv
COPY --from=ts /opt/ts /opt/ts
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    PATH=$PATH:/usr/local/nvidia/bin

# ---- runtime, the default target (last stage): the serving image with CPU-only torch.
FROM serving AS runtime
COPY --from=builder /opt/venv /opt/venv
COPY --from=ts /opt/ts /opt/ts
