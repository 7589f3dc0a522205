"""Slim CPU-first speech-to-text service for NeMo CTC models exported to ONNX (no torch, no NeMo)."""

import os

# numpy's OpenBLAS starts one thread per core for the mel filterbank product (a tiny matmul) and
# those threads keep spinning afterwards, taking the cores ONNX Runtime's threads need next:
# measured on 2 cores, features + ORT for a 1 s clip took 62 ms instead of 21 ms. The features
# gain nothing from BLAS threads, so the service uses one. Set before numpy is first imported;
# an operator's explicit OPENBLAS_NUM_THREADS wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# ONNX Runtime 1.32's Linux wheels send usage telemetry to Microsoft (1DS: process, session, model
# and error events, with a device ID persisted under ~/.cache) unless ORT_DISABLE_TELEMETRY=1 is
# set before it initialises (microsoft/onnxruntime#27379). A self-hosted speech service should not
# phone home, and in a container without a home directory it printed a warning at every start.
# Off by default; an operator who wants it sets ORT_DISABLE_TELEMETRY=0.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
