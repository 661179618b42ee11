"""Layers that replace HF modules where a faster kernel computes the same thing."""
