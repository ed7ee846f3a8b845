# surgeon's deploy side on NVIDIA's TensorRT image, without PyTorch: `surgeon serve` (Triton Inference
# Server through PyTriton), `surgeon build` with full TensorRT, `predict` and `bench` on ONNX files.
# Growth, fine-tuning and export need the train extra (`$1[trt,serve,train]` below adds 5,677 MiB by pip's RECORD).
#
#   docker build -t surgeon .
#   docker run --rm surgeon                                   # surgeon --help
#   docker run --rm --gpus all -p 8000-8002:8000-8002 -v "$PWD/runs:/runs:ro" surgeon \
#       serve /runs/wide/model.onnx --host 0.0.0.0            # HTTP 8000, gRPC 8001, metrics 8002
#
# BASE must be an Ubuntu-based nvcr.io/nvidia/tensorrt:*-py3 image (TensorRT >= 10.9, Python >= 3.10).
ARG BASE=nvcr.io/nvidia/tensorrt:25.10-py3

# ---- build: the surgeon wheel only (no dependencies) ----------------------------------------------
FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY surgeon/ surgeon/
COPY plugins/ plugins/
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- final: the wheel with its trt and serve extras in a virtualenv over the system site-packages --
FROM ${BASE}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    SURGEON_MODELS=/opt/surgeon/models

# PyTriton's Python backend stub links against libpython (surgeon serve puts its directory on
# LD_LIBRARY_PATH). The version follows the base image's python3, so it is not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends "libpython$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
 && rm -rf /var/lib/apt/lists/*

# --system-site-packages: the base image's TensorRT satisfies the trt extra (tensorrt>=10.9).
# DL3013: what is installed is this build's own wheel; its dependencies' ranges are in pyproject.toml.
COPY --from=build /wheels /tmp/wheels
# hadolint ignore=DL3013
RUN python3 -m venv --system-site-packages /opt/venv \
 && set -- /tmp/wheels/surgeon-*.whl \
 && pip install --no-cache-dir "$1[trt,serve]" \
 && rm -rf /tmp/wheels \
 && python -c "import tensorrt, pytriton, surgeon.runtime.serve; print('tensorrt', tensorrt.__version__)" \
 && if python -c "import torch" 2>/dev/null; then echo "the serving image must not carry PyTorch" >&2; exit 1; fi \
 && surgeon serve --help > /dev/null

COPY models/ /opt/surgeon/models/

RUN groupadd --gid 10001 surgeon \
 && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin surgeon
USER 10001:10001
WORKDIR /home/surgeon

EXPOSE 8000 8001 8002
# surgeon serve's readiness (default port; --host 0.0.0.0 in a container): 200 only once every served
# model is ready (Triton's own answered 200 while they were still loading). A Triton that dies ends
# surgeon serve with exit 1, so `docker run --restart` (or the orchestrator) restarts the container.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["surgeon"]
CMD ["--help"]
