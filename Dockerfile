# edgeship toolchain image: the `edgeship` CLI with every converter and runtime it drives
# (torch CPU, onnx/onnxruntime, litert-torch, pnnx/ncnn, fabric), pinned by constraints.txt and
# installed the way the Makefile installs it: a venv, pip>=24, pip install -c constraints.txt -e ".[all,dev]".
#
#   docker build -t edgeship .                    # where python:3.11-slim-bookworm can be pulled
#   docker build -t edgeship --build-arg BASE_IMAGE="$(docker/make-base-image.sh)" .   # offline
#   docker run --rm -v "$PWD:/work" edgeship build --spec examples/mnist.yaml --target local --out out
#
# torch: constraints.txt pins torch==2.13.0, and PyPI's Linux wheel of that version is the CUDA
# build (several GB of nvidia-* wheels). Put the CPU wheel into docker/wheels/ (see its README):
# that folder is pip's find-links (build arg PIP_FIND_LINKS) and 2.13.0+cpu wins over 2.13.0.
# Only plain Dockerfile syntax is used (no BuildKit mounts or heredocs), so the classic builder
# (Docker SDK, docker.io 20.10 without buildx) and BuildKit both build it.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- deps: the venv with every dependency; depends on pyproject + constraints + wheels only ----
FROM ${BASE_IMAGE} AS deps
ARG EXTRAS=all,dev
# pip reads PIP_* from the environment, and build args are environment to RUN.
ARG PIP_FIND_LINKS=/tmp/wheels
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_PROGRESS_BAR=off \
    PIP_DEFAULT_TIMEOUT=180
WORKDIR /opt/edgeship
COPY docker/wheels/ /tmp/wheels/
COPY docker/stub-project.py /tmp/stub-project.py
COPY constraints.txt pyproject.toml ./
RUN python3 /tmp/stub-project.py \
 && python3 -m venv .venv \
 && .venv/bin/pip install --upgrade "pip>=24" \
 && .venv/bin/pip install -c constraints.txt -e ".[${EXTRAS}]" \
 && .venv/bin/pip check \
 && .venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# ---- src: the source tree, without docker/ (the wheels there must not reach the final image) ----
FROM ${BASE_IMAGE} AS src
COPY . /src/
RUN rm -rf /src/docker

# ---- final: base + venv + source, non-root ----
FROM ${BASE_IMAGE}
ENV VIRTUAL_ENV=/opt/edgeship/.venv \
    PATH=/opt/edgeship/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EDGESHIP_HOME=/work/.edgeship
RUN groupadd --gid 10001 edgeship \
 && useradd --uid 10001 --gid 10001 --create-home --shell /bin/bash edgeship \
 && mkdir -p /work \
 && chown edgeship:edgeship /work
COPY --from=deps /opt/edgeship/.venv /opt/edgeship/.venv
COPY --from=src /src/ /opt/edgeship/
USER edgeship
WORKDIR /work
ENTRYPOINT ["edgeship"]
CMD ["--help"]

# Last, so that a new revision only relabels.
ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="edgeship" \
      org.opencontainers.image.description="edgeship toolchain: PyTorch -> ONNX -> ONNX Runtime / TFLite / ncnn artifacts, calibrated INT8, SSH deploy" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
