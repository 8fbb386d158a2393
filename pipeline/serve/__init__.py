"""The QA service: a Ray Serve application (`pipeline.serve.app:app`).

A stage: imports the layers below it (`config`, `store`, `models`, `runtime`), never another stage."""
