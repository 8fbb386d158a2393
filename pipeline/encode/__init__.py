"""The encode stage: passage shards → embedding shards, exactly once and resumable (`job.py`).

A stage: imports the layers below it (`config`, `store`, `models`, `runtime`), never another stage."""
