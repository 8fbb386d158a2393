"""One example request and answer per route of the HTTP API (`examples.json` beside this file), for `docs/api.md`
(`python -m jobs.docs`). Each is a real answer of the demo's app (`serve run configs/serve.yaml` after `make demo`),
trimmed where its `what` says so; the models check their shape (tests/unit/test_reference.py), a running app's
/v1/index its keys (tests/test_serve.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EXAMPLES: dict[str, dict[str, Any]] = json.loads((Path(__file__).parent / "examples.json").read_text("utf-8"))
