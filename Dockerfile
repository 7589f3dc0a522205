# Speech-to-text service: runtime only (numpy, onnxruntime, FastAPI). No torch, no NeMo.
#
#   docker build -t nemo-ctc-asr .
#   docker run -p 8000:8000 nemo-ctc-asr
#   docker build --build-arg ORT_PACKAGE=onnxruntime-gpu==1.31.1 -t nemo-ctc-asr:gpu .   # CUDA hosts
#   docker run --gpus all -e ASR_DEVICE=cuda -p 8000:8000 nemo-ctc-asr:gpu
#
# The bundled model in models/ and tokens/ is baked in; mount your own packages over them:
#   docker run -v $PWD/models:/app/models:ro -v $PWD/tokens:/app/tokens:ro -e ASR_DEFAULT_MODEL=my_model ...
#
# Two stages: the first installs the runtime into /opt/venv and trims it; the second is the base
# image plus that venv, the service and the model. What is trimmed, and why each is safe, is
# below; the size it gives is in the README ("Docker").

FROM python:3.12-slim AS build

# Empty: requirements.txt's pinned onnxruntime (CPU). Set it to a requirement such as
# onnxruntime-gpu==1.31.1 for the CUDA execution provider (its releases lag the CPU package's).
ARG ORT_PACKAGE=

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1

# binutils: strip, for the debug sections some wheels ship (uvloop's 16 MB module is 2 MB without).
RUN apt-get update -q && apt-get install -y -q --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN if [ -n "$ORT_PACKAGE" ]; then sed -i "s/^onnxruntime==.*/${ORT_PACKAGE}/" requirements.txt; fi \
    && python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --no-compile -r requirements.txt

# Trim what a serving process never loads:
# - libonnxruntime.so: ONNX Runtime's C API library (35 MB). The Python binding is its own
#   self-contained module and does not link it (ldd); CUDA's provider library loads through
#   libonnxruntime_providers_shared.so, which stays.
# - onnxruntime's transformers/tools/quantization/datasets: offline tooling (the exporter's
#   quantizer runs in the export environment, not here).
# - tests and numpy's f2py (a Fortran wrapper generator).
# - debug sections of extension modules (strip --strip-debug keeps every symbol). The bundled
#   libraries in *.libs/ are left alone: auditwheel rewrote their headers with patchelf.
RUN SP=/opt/venv/lib/python3.12/site-packages \
    && rm -f $SP/onnxruntime/capi/libonnxruntime.so* \
    && rm -rf $SP/onnxruntime/transformers $SP/onnxruntime/tools $SP/onnxruntime/quantization \
              $SP/onnxruntime/datasets $SP/numpy/f2py \
    && find $SP -depth -type d -name tests -exec rm -rf {} + \
    && find $SP -name '*.so' -not -path '*.libs/*' -exec sh -c \
         'for f; do readelf -S "$f" | grep -q "\.debug_info" && strip --strip-debug "$f"; done; true' sh {} +

COPY service/ service/
COPY deploy/image/precompile.py deploy/image/smoke.py /tmp/
# Bytecode for exactly what the service imports (see the script); then every bundled package
# transcribes through the trimmed runtime (the models are copied here only for that check).
RUN PYTHONPATH=/app /opt/venv/bin/python /tmp/precompile.py
COPY models/ models/
COPY tokens/ tokens/
RUN PYTHONPATH=/app /opt/venv/bin/python /tmp/smoke.py


FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin asr
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app/service service/
COPY models/ models/
COPY tokens/ tokens/

USER asr
EXPOSE 8000
# /health is 200 only once the model is loaded and warmed up.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('ASR_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2).status == 200 else 1)"]
# Host and port come from ASR_HOST / ASR_PORT (defaults 0.0.0.0:8000), like every other setting.
CMD ["python", "-m", "service"]
