"""Distributed DPR pipeline: ingest → encode → build_index → serve, on Ray.

The library in layers; a module imports only from layers below its own, and the stages never from one another
(`tests/unit/test_layout.py` checks it, and that no import runs in a cycle):

1. `errors`, `primitives`: leaves every layer may import.
2. `config/` (the deployment YAML) and `store/` (the storage formats and contracts, and reading them).
3. `models/` (the encoders and the reader) and `runtime/` (how a job runs: its Ray, its CLI, its timings).
4. The stages: `ingest/`, `encode/`, `index/`, `serve/`.
5. `ops/`: what runs the stages and looks after them (the nightly, retention, history, report, evaluation, the app
   client).

Above the library: `jobs/` (the entry points), then `kit/` (what tests and benchmarks share), then `benchmarks/`.
"""

__version__ = "0.1.0"
