"""Ingest's delta planning without I/O."""


def test_delta_planning_without_io():
    """What a delta keeps (new or changed rows), and which rows of a chain later snapshots tombstone."""
    import numpy as np

    from pipeline.ingest.job import BaseKeys
    from pipeline.store.snapshots import Link, removed_later

    base = BaseKeys(np.array([1, 5, 9], np.uint64), np.array([10, 50, 90], np.uint64))
    found, same = base.diff(np.array([5, 7, 9, 1], np.uint64), np.array([50, 70, 91, 10], np.uint64))
    assert found.tolist() == [True, False, True, True] and same.tolist() == [True, False, False, True]
    links = [Link(name, None, np.array(t, np.uint64)) for name, t in (("a", []), ("b", [3, 4]), ("c", [4, 8]))]
    assert [r.tolist() for r in removed_later(links)] == [[3, 4, 8], [4, 8], []]
