"""The build stage: embedding shards → a segmented FAISS IVF-PQ index version, gated and published (`job.py`)."""
