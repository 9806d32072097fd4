"""Benchmarks: looplib against a hand-written PyTorch loop and PyTorch Lightning."""
