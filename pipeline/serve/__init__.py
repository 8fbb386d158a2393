"""The QA service: a Ray Serve application (`pipeline.serve.app:app`)."""
