"""How a job runs: which Ray it joins and FAISS's threads in a task (`raycluster`), the jobs' common `main`
(`cli`), phase timing and peak memory (`telemetry`).

Imports `pipeline.errors`, `pipeline.primitives` and `pipeline.config`."""
