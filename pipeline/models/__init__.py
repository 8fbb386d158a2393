"""The models: the DPR (or any BERT-like) text encoder, its packed variant, the reader, its answer spans and the
token ids the reader is fed.

Imports `pipeline.errors`, `pipeline.primitives` and `pipeline.store` (the docstore that holds token ids)."""
