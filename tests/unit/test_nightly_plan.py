"""The nightly's plans without I/O: the carry-over diff, and the Serve deploy config it writes."""

import pytest

from pipeline.encode.plan import ShardKeys, plan_carry_over, shard_keys
from pipeline.ops.client import with_index_version


def _keys(pairs: list[tuple[str, str]]) -> ShardKeys:
    return shard_keys([p for p, _ in pairs], [h for _, h in pairs])


def test_carry_plan_counts_the_diff_and_finds_moved_passages():
    old = [_keys([("1", "a" * 32), ("2", "b" * 32)]), _keys([("3", "c" * 32), ("4", "d" * 32)])]
    new = [
        _keys([("2", "b" * 32), ("3", "c" * 32)]),  # 3 moved to another shard
        _keys([("4", "e" * 32), ("5", "f" * 32)]),
    ]  # 4 changed, 5 new; 1 deleted
    plan = plan_carry_over(new, old)
    assert plan.sources == [[0, 1], []]
    assert (plan.unchanged, plan.new, plan.changed, plan.deleted) == (2, 1, 1, 1)
    first = plan_carry_over(new, [])
    assert first.sources == [[], []] and (first.unchanged, first.new, first.changed, first.deleted) == (0, 4, 0, 0)


def test_the_version_goes_into_the_ingress_user_config_only():
    """One setting moves the whole app: the QAService's user_config; index_version left on another deployment by
    an older config is dropped (it would mean nothing), other user_config keys are kept."""
    deploy = {
        "http_options": {"port": 8000},
        "applications": [
            {"name": "other", "import_path": "x:y"},
            {
                "name": "qa",
                "import_path": "pipeline.serve.app:app",
                "args": {"config": "c.yaml"},
                "deployments": [
                    {"name": "QAService", "num_replicas": 2},
                    {"name": "Retriever", "user_config": {"index_version": None, "keep": 1}},
                    {"name": "Lexical", "user_config": {"index_version": "old"}},
                ],
            },
        ],
    }
    updated = with_index_version(deploy, "qa", "v2")
    assert updated["applications"][1]["deployments"] == [
        {"name": "QAService", "num_replicas": 2, "user_config": {"index_version": "v2"}},
        {"name": "Retriever", "user_config": {"keep": 1}},
        {"name": "Lexical"},
    ]
    assert updated["applications"][0] == deploy["applications"][0] and updated["http_options"] == {"port": 8000}
    assert deploy["applications"][1]["deployments"][1]["user_config"]["index_version"] is None  # not mutated
    bare = with_index_version({"applications": [{"name": "qa", "import_path": "p:a"}]}, "qa", "v3")
    assert bare["applications"][0]["deployments"] == [{"name": "QAService", "user_config": {"index_version": "v3"}}]
    with pytest.raises(Exception, match="no application named 'missing'"):
        with_index_version(deploy, "missing", "v2")
