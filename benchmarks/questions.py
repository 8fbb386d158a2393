"""Real and unusual question text through the QA app over HTTP, in every mode: the statuses alone, and fired at once
with ordinary questions, whether the ordinary ones still answer as alone; prints one JSON line.

    make demo && python -m benchmarks.questions [--config configs/demo.yaml] [--rounds 20]

Real questions are held out from the demo corpus (Python's standard library documentation): the first 40 words of
the docstrings of numpy's and pyarrow's public callables, 100 of them in name order; unusual ones are each of
`kit.questions.TRICKY` set between ordinary words. Each is asked alone in each mode on /v1/search, and on /v1/ask;
then, `--rounds` times, 8 ordinary questions in every mode are fired at once with 4 of the others in every mode, and
each ordinary answer is compared, passage for passage, with its answer alone.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import requests

from benchmarks.serve import QUESTIONS as ORDINARY
from kit.jobs import REPO
from kit.questions import TRICKY
from kit.serveapp import private_serve

MODES = ("dense", "sparse", "hybrid")


def held_out(count: int = 100, words: int = 40) -> list[str]:
    """The first `words` words of numpy's and pyarrow's public docstrings of at least 20 words, in name order."""
    import numpy
    import pyarrow

    found = []
    for module in (numpy, pyarrow):
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name, None), "__doc__", None) if not name.startswith("_") else None
            split = (doc or "").split()
            if len(split) >= 20 and callable(getattr(module, name)):
                found.append(" ".join(split[:words]))
    unique = list(dict.fromkeys(found))
    return unique[: count // 2] + unique[len(unique) // 2 :][: count - count // 2]


def search(url: str, question: str, mode: str) -> requests.Response:
    return requests.post(f"{url}/v1/search", json={"questions": [question], "k": 10, "mode": mode}, timeout=120)


def ids(response: requests.Response) -> list[str] | None:
    return [hit["id"] for hit in response.json()["results"][0]] if response.status_code == 200 else None


def at_once(url: str, calls: list[tuple[str, str, bool]]) -> list[requests.Response]:
    """Each (question, mode, _) searched from its own thread, all released together."""
    start = threading.Barrier(len(calls))

    def call(asked: tuple[str, str, bool]) -> requests.Response:
        start.wait()
        return search(url, asked[0], asked[1])

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(call, calls))


def measure(url: str, rounds: int) -> dict:
    odd = held_out() + [f"what is {word} in python" for word in TRICKY]
    alone: dict[str, collections.Counter] = {mode: collections.Counter() for mode in (*MODES, "ask")}
    for question in odd:
        for mode in MODES:
            alone[mode][search(url, question, mode).status_code] += 1
        asked = requests.post(f"{url}/v1/ask", json={"question": question, "k": 10}, timeout=120)
        alone["ask"][asked.status_code] += 1
    expected = {(q, mode): ids(search(url, q, mode)) for q in ORDINARY for mode in MODES}
    rng = random.Random(0)
    mixed = collections.Counter()
    for _ in range(rounds):
        calls = [(q, mode, False) for q in ORDINARY for mode in MODES]
        calls += [(q, mode, True) for q in rng.sample(odd, 4) for mode in MODES]
        rng.shuffle(calls)
        for (question, mode, is_odd), response in zip(calls, at_once(url, calls)):
            if is_odd:
                mixed[f"odd_{response.status_code}"] += 1
            else:
                mixed["ordinary"] += 1
                mixed["ordinary_failed"] += response.status_code != 200
                mixed["ordinary_not_as_alone"] += ids(response) != expected[(question, mode)]
    return {
        "questions": len(odd),
        "alone": {mode: {str(status): n for status, n in sorted(c.items())} for mode, c in alone.items()},
        "mixed": {"rounds": rounds, **dict(sorted(mixed.items()))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    from ray import serve

    from pipeline.config import load_config
    from pipeline.serve.app import build_app

    config = load_config(REPO / args.config)
    with private_serve(config.serve.host, config.serve.port) as url:
        serve.run(build_app(config), name="qa", route_prefix="/")
        result = measure(url, args.rounds)
    print(json.dumps({"benchmark": "questions", "index": args.config, **result}))


if __name__ == "__main__":
    main()
