"""The storage formats and contracts, and reading them: the typed manifests between stages, object storage, every
path under `storage.root`, passage keys, shard and snapshot formats, the segmented index and a published version
loaded for search, docstores and their block files, the node cache, the BM25 index. No torch.

Imports `pipeline.errors` and `pipeline.primitives` only, beside its own modules."""
