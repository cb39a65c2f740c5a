# One image for every DSI service; the command picks the service:
#   docker run dsi:cpu serve target | serve drafter | serve orchestrator --targets ... --drafter ...
#
# Needs BuildKit (`docker buildx build`, or `DOCKER_BUILDKIT=1 docker build` with an older CLI, or
# `docker compose build`); `make image` picks whichever this machine has.
#
# Build arguments:
#   TORCH_VARIANT    cpu (default, small), cuda (PyPI's Linux build of torch, which bundles its CUDA
#                    runtime), or cuXYZ (the wheel index https://download.pytorch.org/whl/cuXYZ, e.g.
#                    cu128). The host only needs the NVIDIA driver and the NVIDIA container toolkit.
#   PYTHON_VERSION   the python:X-slim base of both stages.
#   BASE_IMAGE       the base of both stages instead of python:X-slim: any Debian-like image with
#                    python3 (with venv) of that version, e.g. one made with debootstrap and
#                    `docker import` where no registry is reachable (scripts/base-image.sh).
#   PIP_SOURCE       index (default): PyPI, and torch from the PyTorch wheel index; or wheelhouse:
#                    no network at all, every wheel from WHEELHOUSE_IMAGE.
#   WHEELHOUSE_IMAGE with PIP_SOURCE=wheelhouse: an image whose / holds the wheels, made on the host
#                    with `pip wheel` (scripts/wheelhouse.sh) and `docker import` (scripts/build-image.sh).
# torch's version always comes from constraints.txt, so the image runs the tested version.
ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim
ARG PIP_SOURCE=index
ARG WHEELHOUSE_IMAGE=scratch

# ---------------------------------------------------------------------------------------------------
# slim: the base both the builder and the runtime start from (they must share the same python3).
FROM ${BASE_IMAGE} AS slim

# wheelhouse: only read (bind-mounted) when PIP_SOURCE=wheelhouse; BuildKit skips unused stages.
FROM ${WHEELHOUSE_IMAGE} AS wheelhouse

# ---------------------------------------------------------------------------------------------------
# deps-index: a virtualenv in /opt/venv with torch and the dependencies, from PyPI and the PyTorch index.
FROM slim AS deps-index
ARG TORCH_VARIANT=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
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

# The other dependencies and the build backend, read from pyproject.toml, so that editing the code
# does not reinstall them.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(p['project']['dependencies'] + p['build-system']['requires']))" > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt

# ---------------------------------------------------------------------------------------------------
# deps-wheelhouse: the same virtualenv with no network: every wheel from the wheelhouse image.
FROM slim AS deps-wheelhouse
ARG TORCH_VARIANT=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_INDEX=1 \
    PIP_FIND_LINKS=/wheels
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt pyproject.toml ./
RUN --mount=type=bind,from=wheelhouse,target=/wheels \
    set -eu; \
    torch_version="$(sed -n 's/^torch==//p' constraints.txt)"; \
    test -n "$torch_version" || { echo "constraints.txt pins no torch" >&2; exit 1; }; \
    pip install --no-cache-dir -c constraints.txt "torch==${torch_version}" \
    && python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(p['project']['dependencies'] + p['build-system']['requires']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt

# ---------------------------------------------------------------------------------------------------
# venv: the dependencies as they ship (no pip, no build backend); rebuilt only when they change.
FROM deps-${PIP_SOURCE} AS venv
RUN pip uninstall --yes setuptools wheel pip

# builder: the dsi package (not editable), built on top of the chosen dependencies with the build
# backend already in the venv (no network), and set apart under /overlay so that the runtime image
# takes the large, rarely changing venv layer and this small one separately.
FROM deps-${PIP_SOURCE} AS builder
COPY README.md ./
COPY services ./services
COPY dsi ./dsi
RUN pip install --no-deps --no-build-isolation --no-cache-dir -c constraints.txt . \
    && site="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && mkdir -p "/overlay$site" /overlay/opt/venv/bin \
    && cp -a "$site/dsi" "$site"/dsi-*.dist-info "/overlay$site/" \
    && cp -a /opt/venv/bin/dsi /overlay/opt/venv/bin/

# The built-in model pair: dsi/pretrained when it is in the package, otherwise the tiny random pair,
# built here once so that every container (target, drafter and the orchestrator, which loads the
# tokenizer from the path the target reports) finds it at the same path without building it.
ENV DSI_CACHE_DIR=/opt/dsi/cache
RUN mkdir -p /opt/dsi/cache /opt/dsi/hf \
    && python3 -c "from dsi.default_pair import ensure_default_pair; print(ensure_default_pair())"

# ---------------------------------------------------------------------------------------------------
# runtime: the slim base, the virtualenv and the model cache; no compiler, no pip, not root.
FROM slim AS runtime
ARG TORCH_VARIANT=cpu
ARG PIP_SOURCE=index
LABEL org.opencontainers.image.title="dsi" \
      org.opencontainers.image.description="Distributed Speculative Inference as gRPC microservices" \
      org.opencontainers.image.licenses="Apache-2.0" \
      dsi.torch-variant="${TORCH_VARIANT}" \
      dsi.pip-source="${PIP_SOURCE}"

RUN groupadd --system --gid 10001 dsi \
    && useradd --system --uid 10001 --gid dsi --create-home --home-dir /home/dsi --shell /usr/sbin/nologin dsi

COPY --from=venv /opt/venv /opt/venv
COPY --from=builder /overlay/opt/venv /opt/venv
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
