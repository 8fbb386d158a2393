"""The build stage: embedding shards → a segmented FAISS IVF-PQ index version, gated and published (`job.py`).

A stage: imports the layers below it (`config`, `store`, `models`, `runtime`), never another stage."""
