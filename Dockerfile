# One image for every DSI service; the command picks the service:
#   docker run dsi:cpu serve target | serve drafter | serve orchestrator --targets ... --drafter ...
#
# Build arguments:
#   TORCH_VARIANT  cpu (default, small), cuda (PyPI's Linux build of torch, which bundles its CUDA
#                  runtime), or cuXYZ (the wheel index https://download.pytorch.org/whl/cuXYZ, e.g.
#                  cu128). The host only needs the NVIDIA driver and the NVIDIA container toolkit.
#   PYTHON_VERSION the python:X-slim base of both stages.
# torch's version always comes from constraints.txt, so the image runs the tested version.
ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------------------------------
# builder: a virtualenv in /opt/venv with torch, the dependencies and the dsi package (not editable).
FROM python:${PYTHON_VERSION}-slim AS builder
ARG TORCH_VARIANT=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# torch first and on its own layer: it is by far the largest download and changes least often.
COPY constraints.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    torch_version="$(sed -n 's/^torch==//p' constraints.txt)"; \
    test -n "$torch_version" || { echo "constraints.txt pins no torch" >&2; exit 1; }; \
    case "$TORCH_VARIANT" in \
      cpu|cu[0-9]*) pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${torch_version}" ;; \
      cuda) pip install "torch==${torch_version}" ;; \
      *) echo "TORCH_VARIANT must be cpu, cuda or cuXYZ, got '${TORCH_VARIANT}'" >&2; exit 1 ;; \
    esac

# The other dependencies, read from pyproject.toml, so that editing the code does not reinstall them.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt

COPY README.md ./
COPY services ./services
COPY dsi ./dsi
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps -c constraints.txt . \
    && pip uninstall --yes pip

# The built-in model pair: dsi/pretrained when it is in the package, otherwise the tiny random pair,
# built here once so that every container (target, drafter and the orchestrator, which loads the
# tokenizer from the path the target reports) finds it at the same path without building it.
ENV DSI_CACHE_DIR=/opt/dsi/cache
RUN mkdir -p /opt/dsi/cache /opt/dsi/hf \
    && python -c "from dsi.default_pair import ensure_default_pair; print(ensure_default_pair())"

# ---------------------------------------------------------------------------------------------------
# runtime: the slim base, the virtualenv and the model cache; no compiler, no pip, not root.
FROM python:${PYTHON_VERSION}-slim AS runtime
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="dsi" \
      org.opencontainers.image.description="Distributed Speculative Inference as gRPC microservices" \
      org.opencontainers.image.licenses="Apache-2.0" \
      dsi.torch-variant="${TORCH_VARIANT}"

RUN groupadd --system --gid 10001 dsi \
    && useradd --system --uid 10001 --gid dsi --create-home --home-dir /home/dsi --shell /usr/sbin/nologin dsi

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=10001:10001 /opt/dsi /opt/dsi

# Every flag of every service also reads an environment variable (see `dsi serve ROLE --help`).
# Inside a container the services must bind every interface; each role has its own port.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOKENIZERS_PARALLELISM=false \
    DSI_CACHE_DIR=/opt/dsi/cache \
    HF_HOME=/opt/dsi/hf \
    DSI_TARGET_HOST=0.0.0.0 \
    DSI_TARGET_PORT=50061 \
    DSI_DRAFTER_HOST=0.0.0.0 \
    DSI_DRAFTER_PORT=50071 \
    DSI_ORCHESTRATOR_HOST=0.0.0.0 \
    DSI_ORCHESTRATOR_PORT=50051 \
    DSI_HEALTH_PORT=50051

USER 10001:10001
WORKDIR /home/dsi
EXPOSE 50051 50061 50071

# The image cannot know which role a container runs, so the probed port is DSI_HEALTH_PORT
# (50051, the orchestrator's, by default; docker-compose.yml sets each service's own check).
# `dsi health` asks the grpc.health.v1 service and exits 0 only when it answers SERVING.
HEALTHCHECK --interval=10s --timeout=20s --start-period=300s --retries=3 \
    CMD dsi health "127.0.0.1:${DSI_HEALTH_PORT}" --timeout-s 5 || exit 1

ENTRYPOINT ["dsi"]
CMD ["--help"]
