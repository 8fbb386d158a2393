"""The ingest stage: passage files (TSV, JSONL, Parquet; local, `s3://`, `gs://`) → a passage snapshot, full or a
delta on the last one (`job.py`); the input formats (`corpus.py`) and the demo's corpus (`demo_corpus.py`).

A stage: imports the layers below it (`config`, `store`, `models`, `runtime`), never another stage."""
