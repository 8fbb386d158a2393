"""The Grafana dashboard (`infra/grafana/qa-dashboard.json`): it parses, every panel is addressable and queries the
`${datasource}` variable, and every metric name its PromQL selects is one the app's `Metrics` exposes (the live app's
/metrics: test_serve). The extractor of metric names, on hand-written PromQL."""

import json

import pytest

from kit.dashboard import (
    DASHBOARD,
    DATASOURCE,
    dashboard_metric_names,
    expressions,
    load_dashboard,
    metric_names,
    panels,
    sample_names,
)
from pipeline.serve.metrics import Metrics

USED = {
    "qa_requests_total",
    "qa_request_seconds_bucket",
    "qa_requests_in_flight",
    "qa_batch_queue_depth",
    "qa_stage_seconds_bucket",
    "qa_index_version_info",
}


@pytest.fixture(scope="module")
def dashboard():
    return load_dashboard()


def _walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from _walk(child)


def test_the_dashboard_parses_as_a_grafana_dashboard(dashboard):
    assert json.loads(DASHBOARD.read_text()) == dashboard
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"] and dashboard["title"]
    assert dashboard["id"] is None  # an import creates it
    [variable] = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")


def test_every_panel_has_an_id_a_title_a_place_and_queries(dashboard):
    found = panels(dashboard)
    assert len(found) >= 8
    ids = [panel["id"] for panel in found]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) for i in ids)
    for panel in found:
        assert panel["title"].strip() and panel["type"]
        assert panel["targets"] and all(t["expr"].strip() and t["refId"] for t in panel["targets"]), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        place = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= set(place) and place["x"] + place["w"] <= 24 and place["h"] > 0


def test_no_two_panels_overlap(dashboard):
    cells = {}
    for panel in panels(dashboard):
        p = panel["gridPos"]
        for x in range(p["x"], p["x"] + p["w"]):
            for y in range(p["y"], p["y"] + p["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[x, y] = panel["title"]


def test_every_query_uses_the_datasource_variable_and_no_uid_is_hard_coded(dashboard):
    for panel in panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]
    uids = [node["uid"] for node in _walk(dashboard["panels"]) if isinstance(node, dict) and "uid" in node]
    assert uids and set(uids) == {"${datasource}"}
    assert "-- Grafana --" not in DASHBOARD.read_text()


def test_the_dashboard_covers_the_panels_an_operator_needs(dashboard):
    text = "\n".join(expressions(dashboard))
    assert 'status!~"2.."' in text and 'status=~"5.."' in text  # non-2xx and 5xx separately
    for metric, by in (("qa_request_seconds", "route"), ("qa_stage_seconds", "stage")):
        for q in ("0.5", "0.99"):
            assert f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket" in text
    version = [p for p in panels(dashboard) if p["title"] == "Index version served"]
    assert version[0]["type"] in ("table", "stat") and version[0]["targets"][0]["format"] == "table"
    assert "by (version)" in version[0]["targets"][0]["expr"]


def test_the_dashboard_selects_exactly_these_metrics(dashboard):
    assert dashboard_metric_names(dashboard) == USED


def test_the_app_metrics_expose_every_name_the_dashboard_selects(dashboard):
    """The series exist once each is touched as the app touches them (the live app: test_serve)."""
    metrics = Metrics()
    metrics.requests.labels("/v1/search", "200").inc()
    metrics.latency.labels("/v1/search").observe(0.1)
    for stage in ("encode", "search", "read"):
        metrics.stage.labels(stage).observe(0.01)
    metrics.serving("v1")
    metrics.in_flight.labels("/v1/search").inc()
    exposed = sample_names(metrics.exposition().decode())
    assert dashboard_metric_names(dashboard) <= exposed, dashboard_metric_names(dashboard) - exposed


HAND_WRITTEN = """
histogram_quantile(0.99, sum by (le, route) (rate(qa_request_seconds_bucket{route=~"/v1/.*", status!="rate"}[5m])))
  / on (route) group_left sum without (instance) (rate(qa_requests_total[$__rate_interval] offset 1h))
  > bool 0.5e-1
and ignoring(le) {__name__="qa_index_version_info", job="qa_stage_seconds_count"}
or count_values("version", qa_index_version_info @ start())
unless max_over_time(qa:errors:ratio5m[1h:1m]) * Inf
"""


def test_the_extractor_finds_the_metric_names_and_nothing_else():
    assert metric_names(HAND_WRITTEN) == {
        "qa_request_seconds_bucket",
        "qa_requests_total",
        "qa_index_version_info",
        "qa:errors:ratio5m",
    }


def test_the_extractor_returns_no_function_keyword_or_label():
    """What a naive `[a-z_]+` scan would also return: functions, aggregations, keywords, labels, strings, units."""
    not_names = {
        "histogram_quantile",
        "sum",
        "by",
        "le",
        "route",
        "rate",
        "status",
        "on",
        "group_left",
        "without",
        "instance",
        "offset",
        "h",
        "bool",
        "e",
        "and",
        "ignoring",
        "__name__",
        "job",
        "qa_stage_seconds_count",
        "or",
        "count_values",
        "version",
        "start",
        "unless",
        "max_over_time",
        "m",
        "Inf",
        "__rate_interval",
    }
    assert not metric_names(HAND_WRITTEN) & not_names
    assert metric_names("sum(rate(x_total[5m]))") == {"x_total"}
    assert metric_names("sum by (le) (rate(x_bucket[5m]))") == {"x_bucket"}
    assert metric_names("SUM BY (le) (x)") == {"x"}
    assert metric_names("up") == {"up"} and metric_names("1 + 2") == set()


def test_the_extractor_refuses_what_it_cannot_tell():
    with pytest.raises(ValueError, match="__name__"):
        metric_names('{__name__=~"qa_.*"}')
    for broken in ("sum(rate(x[5m])", "rate(x[5m]))", 'x{job="a}', "x[5m"):
        with pytest.raises(ValueError):
            metric_names(broken)


def test_sample_names_are_the_exposition_sample_names():
    text = '# HELP a_total x\n# TYPE a_total counter\na_total{l="1 2"} 1.0\nb 2\n\n# TYPE c histogram\nc_sum 0.1\n'
    assert sample_names(text) == {"a_total", "b", "c_sum"}
