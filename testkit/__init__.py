"""Helpers shared by the test suite and the benchmarks (never imported by the service).

``speech``: offline synthesized speech (espeak-ng + sox), the sentences and voices the parity
clips use. ``server``: the real service started as users start it, on a free port. ``nemo``:
where the NeMo export environment lives.
"""
