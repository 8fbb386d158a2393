"""Retention's plan (`pipeline.ops.retention.plan_gc`, pure) on a hand-made store: which versions stay and why, what
goes and in which order, and what is never touched. tests/test_retention.py runs `jobs.gc` and the nightly's step on
real stores (S3 and local) over a dozen nights."""

from pipeline.config import RetainConfig
from pipeline.ops.retention import StoreView, VersionFacts, plan_gc
from pipeline.store.storage import StoredObject

DAY = 86400.0
NOW = 100 * DAY


def _version(name: str, age_days: float, files: list[str], snapshot: str, fingerprint: str = "fp1") -> VersionFacts:
    return VersionFacts(name, NOW - age_days * DAY, frozenset(files), snapshot, fingerprint)


def _view(extra: list[tuple[str, float]] = ()) -> StoreView:
    """Four versions, oldest v1: v1 and v2 on the chain s1 <- s2 (quantizer q1); v3 a compaction of v2's rows on
    the same chain; v4 on a full snapshot s3 (its own quantizer q2), encoded under fingerprint fp2 as well."""
    versions = {
        "v1": _version("v1", 40, ["quantizers/q1", "segments/a/ivf.bin", "v1/tombstones.npy"], "s1"),
        "v2": _version("v2", 30, ["quantizers/q1", "segments/a/ivf.bin", "segments/b/ivf.bin"], "s2"),
        "v3": _version("v3", 20, ["quantizers/q1", "segments/c/ivf.bin", "lexical/x.idx"], "s2"),
        "v4": _version("v4", 10, ["quantizers/q2", "segments/d/ivf.bin", "lexical/x.idx"], "s3"),
    }
    objects = [f"indexes/{name}" for facts in versions.values() for name in facts.files]
    objects += [f"indexes/{v}/manifest.json" for v in versions] + ["indexes/LATEST", "indexes/segments/z/ivf.bin"]
    for snapshot in ("s1", "s2", "s3"):
        objects += [f"passages/{snapshot}/part-0.parquet", f"passages/{snapshot}/_manifest.json"]
        objects += [f"embeddings/{snapshot}/fp1/part-0.parquet", f"nightly/{snapshot}.json"]
    objects += ["embeddings/s3/fp2/part-0.parquet", "passages/LATEST", "nightly/history/r1.json"]
    stored = [StoredObject(rel, 10, NOW - 50 * DAY) for rel in dict.fromkeys(objects)]
    stored += [StoredObject(rel, 10, NOW - age * DAY) for rel, age in extra]
    chains = {"s1": ["s1"], "s2": ["s1", "s2"], "s3": ["s3"]}
    return StoreView(stored, versions, chains, latest_version="v4", latest_snapshot="s3")


def _retain(**settings) -> RetainConfig:
    return RetainConfig(**{"versions": 1, "min_age_h": 24, **settings})


def test_the_newest_versions_latest_pinned_and_held_stay_with_what_they_list_and_their_chains():
    plan = plan_gc(_view(), _retain(pinned=["v2"]), held=[], now=NOW)
    assert plan.keep == ["v4", "v2"] and plan.drop == ["v3", "v1"]
    assert plan.why == {"v4": "one of the newest 1", "v2": "retain.pinned"}
    deleted = set(plan.delete)
    # v3's own segment and v1's tombstones go; what v2 and v4 list stays (the shared quantizer q1, BM25 file)
    assert {"indexes/segments/c/ivf.bin", "indexes/v1/tombstones.npy", "indexes/segments/z/ivf.bin"} <= deleted
    assert not deleted & {"indexes/quantizers/q1", "indexes/segments/a/ivf.bin", "indexes/lexical/x.idx"}
    # v2's chain s1 <- s2 stays under v2's fingerprint; v4's s3 under fp1, and fp2 (no version uses it) goes
    assert not any(rel.startswith(("passages/s1/", "passages/s2/", "embeddings/s1/fp1/")) for rel in deleted)
    assert "embeddings/s3/fp2/part-0.parquet" in deleted and "embeddings/s3/fp1/part-0.parquet" not in deleted
    # never: the pointers, the history, the night records of kept snapshots
    assert not deleted & {"indexes/LATEST", "passages/LATEST", "nightly/history/r1.json", "nightly/s2.json"}
    assert plan.delete_bytes == 10 * len(plan.delete) and plan.store_bytes == 10 * len(_view().objects)


def test_manifests_of_the_versions_that_go_are_deleted_first():
    plan = plan_gc(_view(), _retain(), held=["v3"], now=NOW)
    assert plan.drop == ["v2", "v1"]
    first = plan.delete[:2]
    assert sorted(first) == ["indexes/v1/manifest.json", "indexes/v2/manifest.json"]
    shared = [i for i, rel in enumerate(plan.delete) if rel.startswith("indexes/segments/")]
    passages = [i for i, rel in enumerate(plan.delete) if rel.startswith("passages/")]
    assert max(shared, default=-1) < min(passages, default=len(plan.delete))


def test_a_held_version_stays_and_nothing_young_is_deleted():
    young = [("indexes/segments/new/ivf.bin", 0.2), ("passages/s9/part-0.parquet", 0.1)]  # a night in flight
    view = _view(young)
    plan = plan_gc(view, _retain(), held=["v1"], now=NOW)
    assert plan.keep == ["v4", "v1"] and plan.why["v1"] == "held by the app"
    assert not {rel for rel, _ in young} & set(plan.delete) and plan.young == 2
    # a version published within min_age_h stays, with its files, whatever retain.versions says
    fresh = _view()
    fresh.versions["v3"] = _version("v3", 0.5, ["quantizers/q1", "segments/c/ivf.bin", "lexical/x.idx"], "s2")
    fresh.versions["v4"] = _version("v4", 0.2, ["quantizers/q2", "segments/d/ivf.bin", "lexical/x.idx"], "s3")
    plan = plan_gc(fresh, _retain(), held=[], now=NOW)
    assert "v3" in plan.keep and "indexes/segments/c/ivf.bin" not in plan.delete
    assert plan.why["v3"] == "younger than retain.min_age_h=24"


def test_with_enough_versions_retained_nothing_goes_but_garbage():
    plan = plan_gc(_view(), _retain(versions=7), held=[], now=NOW)
    assert plan.drop == [] and plan.delete == ["indexes/segments/z/ivf.bin", "embeddings/s3/fp2/part-0.parquet"]
