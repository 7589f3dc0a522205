# Speech-to-text service: runtime only (numpy, onnxruntime, FastAPI). No torch, no NeMo.
#
#   docker build -t nemo-ctc-asr .
#   docker run -p 8000:8000 nemo-ctc-asr
#   docker build --build-arg ORT_PACKAGE=onnxruntime-gpu==1.31.1 -t nemo-ctc-asr:gpu .   # CUDA hosts
#   docker run --gpus all -e ASR_DEVICE=cuda -p 8000:8000 nemo-ctc-asr:gpu
#
# The bundled model in models/ and tokens/ is baked in; mount your own packages over them:
#   docker run -v $PWD/models:/app/models:ro -v $PWD/tokens:/app/tokens:ro -e ASR_DEFAULT_MODEL=my_model ...
FROM python:3.12-slim

# Empty: requirements.txt's pinned onnxruntime (CPU). Set it to a requirement such as
# onnxruntime-gpu==1.31.1 for the CUDA execution provider (its releases lag the CPU package's).
ARG ORT_PACKAGE=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements.txt .
RUN if [ -n "$ORT_PACKAGE" ]; then sed -i "s/^onnxruntime==.*/${ORT_PACKAGE}/" requirements.txt; fi \
    && pip install -r requirements.txt \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin asr

COPY service/ service/
COPY models/ models/
COPY tokens/ tokens/

USER asr
EXPOSE 8000
# /health is 200 only once the model is loaded and warmed up.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('ASR_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2).status == 200 else 1)"]
# Host and port come from ASR_HOST / ASR_PORT (defaults 0.0.0.0:8000), like every other setting.
CMD ["python", "-m", "service"]
