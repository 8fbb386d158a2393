"""The encode stage: passage shards → embedding shards, exactly once and resumable (`job.py`)."""
