"""Slim CPU-first speech-to-text service for NeMo CTC models exported to ONNX (no torch, no NeMo)."""

__version__ = "0.1.0"
