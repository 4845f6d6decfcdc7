"""Compression of trained runs (see docs/compression.md)."""
