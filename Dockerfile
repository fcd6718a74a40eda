# GPU training image: the project's `gpu` extra (CUDA torch, fbgemm-gpu, torchrec, FAISS GPU) on an
# NVIDIA CUDA base. Build and run (see docs/multinode.md):
#   docker build -t funnel:gpu .
#   docker run --rm --gpus all --ipc=host funnel:gpu doctor
#
# The torch wheel from PyPI carries its own CUDA user-space libraries (cuBLAS, cuDNN, NCCL as pip
# packages), so the host only provides the driver (through the NVIDIA container toolkit). The base
# image matches torch's CUDA anyway so that tools in the image and the wheels agree, and so that the
# image declares the CUDA version the driver must support (NVIDIA_REQUIRE_CUDA).
#
# Keep these in step (tests/test_launch_templates.py checks them against pyproject.toml):
#   TORCH_VERSION     = the torch pin in pyproject.toml
#   TORCH_CUDA        = torch.version.cuda of that wheel (2.14.1 on PyPI: 13.0; it pins cuda-toolkit 13.0.3)
#   BASE_IMAGE        = an nvidia/cuda tag of the same CUDA major.minor
#   FAISS_GPU_VERSION = the faiss-gpu pin of the gpu extra
# FAISS is the exception to "one CUDA": faiss-gpu 1.15.1 is a CUDA 12 build (the CUDA 13 wheel does
# not install beside torch's NCCL, see pyproject.toml) and brings its own CUDA 12 runtime, cuBLAS and
# cuRAND as pip packages (~700 MiB). A driver new enough for torch's CUDA 13 runs both.
# Pin BASE_IMAGE further by digest for reproducible builds (nvidia/cuda:<tag>@sha256:...).
# The `-base-` flavour of the same tag also works and is smaller: the wheels bring the libraries.
ARG BASE_IMAGE=nvidia/cuda:13.0.3-runtime-ubuntu24.04

FROM ${BASE_IMAGE}

# An ARG before FROM is only visible to FROM: declare it again for the label.
ARG BASE_IMAGE
ARG TORCH_VERSION=2.14.1
ARG TORCH_CUDA=13.0
ARG FAISS_GPU_VERSION=1.15.1

LABEL org.opencontainers.image.title="funnel" \
      org.opencontainers.image.description="Sharded recsys training (Lightning + TorchRec + FBGEMM + FAISS), GPU build" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# Build-time only (ARG, not ENV): apt in a running container should not be silently non-interactive.
ARG DEBIAN_FRONTEND=noninteractive

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# Ubuntu 24.04's own Python is 3.12, inside pyproject's >=3.11,<3.13 and covered by every wheel
# the gpu extra needs; a venv because the system interpreter is externally managed (PEP 668).
# apt packages are not version-pinned (DL3008): Ubuntu's archive keeps only the latest build of
# each, so an exact pin breaks the build at the next security update. The base tag is pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv "${VIRTUAL_ENV}"

WORKDIR /opt/funnel

# Dependencies first, from the metadata alone (empty package dirs), so that this multi-GB layer is
# rebuilt only when pyproject.toml changes, not on every source edit. DL3013 (pin pip versions)
# misreads the local project '.[gpu]' as an unpinned package; the pins live in pyproject.toml.
COPY pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN mkdir data models trainer launch serving \
    && pip install '.[gpu]'

# Fail the build, not the first job, when pyproject's torch stops matching the base image's CUDA.
# Only torch is imported: fbgemm-gpu needs the driver's libnvidia-ml, absent at build time.
RUN python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION}' \
or torch.version.cuda != '${TORCH_CUDA}')" \
    || { echo "expected torch ${TORCH_VERSION} for CUDA ${TORCH_CUDA}: see the top of the Dockerfile" >&2; exit 1; }
# faiss-gpu and faiss-cpu share the `faiss` import package: exactly the GPU one must be there. Checked
# from the metadata; its GPU code needs a driver, and `python -m launch.gpu_check` exercises it.
RUN python -c "import importlib.metadata as m, sys; sys.exit(m.version('faiss-gpu') != '${FAISS_GPU_VERSION}')" \
    && ! python -m pip show -q faiss-cpu 2>/dev/null \
    || { echo "expected faiss-gpu ${FAISS_GPU_VERSION} and no faiss-cpu: see pyproject.toml's gpu extra" >&2; exit 1; }

# The project itself; --no-deps: the layer above already resolved everything.
COPY data ./data
COPY models ./models
COPY trainer ./trainer
COPY launch ./launch
COPY serving ./serving
RUN pip install --no-deps --force-reinstall .

# Non-root, with a numeric uid so Kubernetes' runAsNonRoot can verify it (Ubuntu 24.04 images
# already use uid 1000 for the `ubuntu` user). /workspace is the writable working directory: runs/,
# wandb/ and lightning_logs/ land there; mount a volume on it to keep them.
# The source copy goes: the venv holds the installed package.
WORKDIR /workspace
RUN rm -rf /opt/funnel \
    && useradd --create-home --uid 10001 --user-group funnel \
    && chown funnel:funnel /workspace
COPY --chown=funnel:funnel configs ./configs
USER 10001:10001

# W&B: no WANDB_MODE here on purpose, the choice is the user's. Configs with `logger: {kind: wandb}`
# log offline unless WANDB_MODE=online (or logger.offline: false): pass -e WANDB_MODE=online
# -e WANDB_API_KEY=... to log live, or keep offline runs and `wandb sync` them from run_dir later.
ENTRYPOINT ["funnel"]
CMD ["doctor"]
