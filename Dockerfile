# streamserver, installed the way README.md installs it (`pip install torch==2.13.0 && pip install .`),
# for the GPU pods of deploy/k8s or for `docker run`:
#
#   docker build -t streamserver:0.1.0 .
#   docker run --gpus all -p 8000:8000 streamserver:0.1.0
#
# torch: PyPI's torch==2.13.0 for Linux x86_64 is the CUDA build (it pulls NVIDIA's CUDA runtime
# wheels, several GB), so no CUDA base image is needed; the GPU node needs the NVIDIA driver and
# container toolkit (on Kubernetes, NVIDIA's device plugin). For another CUDA version, or a
# CPU-only image, take torch from PyTorch's own index:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t streamserver:cpu .
# Sortformer diarization (NeMo, large): --build-arg EXTRAS=sortformer.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Some dependencies come as source only (resemblyzer's webrtcvad is C): compile them here, so the
# final image carries no compiler.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/streamserver
ENV PATH=/opt/streamserver/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, in its own layer: it is most of the image and changes least.
ARG TORCH_INDEX_URL=
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
WORKDIR /src
COPY . .
ARG EXTRAS=
RUN pip install ".${EXTRAS:+[$EXTRAS]}"

FROM ${PYTHON_IMAGE}
# Runtime system packages: libgomp1 for numba's OpenMP threading layer (openai-whisper imports
# numba). No ffmpeg: audio is decoded in-process by PyAV, whose wheel carries FFmpeg's libraries.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 streamserver \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/streamserver streamserver
COPY --from=build /opt/streamserver /opt/streamserver
# NVIDIA_*: what NVIDIA's container runtime mounts, the GPU's compute libraries and NVML (the
# server reads memory and utilisation through it).
ENV PATH=/opt/streamserver/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/streamserver
EXPOSE 8000
# SIGTERM (docker stop, Kubernetes) drains the streams; give the container a stop timeout longer
# than --drain-seconds (`docker stop -t 45`, terminationGracePeriodSeconds).
CMD ["streamserver", "--host", "0.0.0.0"]
