"""Compiled kernels, built on first use (see cpu.py)."""
