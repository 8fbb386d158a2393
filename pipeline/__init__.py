"""Distributed DPR pipeline: ingest → encode → build_index → serve, on Ray."""

__version__ = "0.1.0"
