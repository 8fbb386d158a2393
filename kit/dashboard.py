"""The Grafana dashboard of the QA app (`infra/grafana/qa-dashboard.json`) as data: its panels, its PromQL, and the
metric names that PromQL selects, to check them against what the app's `/metrics` exposes.

Names are kept as a query writes them, the sample names of the exposition: `qa_requests_total` (a counter's
sample), `qa_request_seconds_bucket` (a histogram's), `qa_index_version_info` (a gauge's). They are checked
against the sample names of a `/metrics` answer (`sample_names`), not against its `# TYPE` families, whose names
differ for counters and histograms.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[1] / "infra" / "grafana" / "qa-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# PromQL words that are never metric names where they stand: aggregation operators (which may take `by (...)`
# before their parenthesis), binary keywords, and the modifiers whose parenthesis holds label names.
AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "atan2", "bool", "offset", "inf", "nan"}) | AGGREGATIONS | LABEL_LISTS

_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[A-Za-z0-9_]*")
_NAME_MATCHER = re.compile(r"""(?<![A-Za-z0-9_])__name__\s*(=~|!~|!=|=)\s*(["'`])((?:\\.|(?!\2).)*)\2""")
_CLOSING = {"(": ")", "[": "]", "{": "}"}


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included (a row itself is not a panel with queries)."""
    found = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", []) if "expr" in target]


def _string_end(expr: str, start: int) -> int:
    """The index just past the quoted string opening at `start` ("...", '...' with escapes; `...` raw)."""
    quote, i = expr[start], start + 1
    while i < len(expr):
        if expr[i] == "\\" and quote != "`":
            i += 2
            continue
        if expr[i] == quote:
            return i + 1
        i += 1
    raise ValueError(f"unterminated string at {start} in {expr!r}")


def _group_end(expr: str, start: int) -> int:
    """The index just past the bracket closing the one at `start` (nested brackets and strings skipped)."""
    stack, i = [_CLOSING[expr[start]]], start + 1
    while i < len(expr):
        char = expr[i]
        if char in "\"'`":
            i = _string_end(expr, i)
            continue
        if char in _CLOSING:
            stack.append(_CLOSING[char])
        elif char in ")]}":
            if char != stack.pop():
                raise ValueError(f"mismatched {char!r} at {i} in {expr!r}")
            if not stack:
                return i + 1
        i += 1
    raise ValueError(f"unclosed {expr[start]!r} at {start} in {expr!r}")


def _next_char(expr: str, i: int) -> str:
    while i < len(expr) and expr[i].isspace():
        i += 1
    return expr[i] if i < len(expr) else ""


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects, as written (`_bucket`, `_total` and all).

    Not names: functions (an identifier before `(`), aggregation operators and keywords, label names (inside
    `{...}`, and in the parentheses of by/without/on/ignoring/group_left/group_right), strings, numbers and
    durations, range and subquery brackets, Grafana variables (`$x`, `${x}`, `[[x]]`). A selector naming its metric
    with `{__name__="..."}` counts; a name matched by a regex or negation cannot be listed, so ValueError, as for
    unbalanced brackets and unterminated strings.
    """
    names: set[str] = set()
    depth, i = [], 0
    while i < len(expr):
        char = expr[i]
        if char.isspace():
            i += 1
        elif char == "#":  # a comment, to the end of the line
            end = expr.find("\n", i)
            i = len(expr) if end < 0 else end
        elif char in "\"'`":
            i = _string_end(expr, i)
        elif char == "{":  # label matchers: no metric names but `__name__`'s
            end = _group_end(expr, i)
            for op, _, value in _NAME_MATCHER.findall(expr[i:end]):
                if op != "=":
                    raise ValueError(f"__name__{op} selects metric names that cannot be listed: {expr!r}")
                names.add(value)
            i = end
        elif char == "[":  # a range, a subquery's range and step, or a Grafana [[variable]]
            i = _group_end(expr, i)
        elif char == "$":  # a Grafana variable: ${name...} or $name
            if expr.startswith("${", i):
                i = _group_end(expr, i + 1)
            else:
                match = _IDENTIFIER.match(expr, i + 1)
                i = match.end() if match else i + 1
        elif char == "(":
            depth.append(i)
            i += 1
        elif char == ")":
            if not depth:
                raise ValueError(f"unbalanced ')' at {i} in {expr!r}")
            depth.pop()
            i += 1
        elif char in "]}":
            raise ValueError(f"unbalanced {char!r} at {i} in {expr!r}")
        elif char.isdigit() or (char == "." and expr[i + 1 : i + 2].isdigit()):
            i = _NUMBER.match(expr, i).end()
        elif match := _IDENTIFIER.match(expr, i):
            word, i = match.group(), match.end()
            if word.lower() in LABEL_LISTS:
                if _next_char(expr, i) == "(":  # label names
                    i = _group_end(expr, expr.index("(", i))
            elif word.lower() in KEYWORDS or _next_char(expr, i) == "(":  # a keyword, or a function's name
                continue
            else:
                names.add(word)
        else:  # operators, commas, `@`
            i += 1
    if depth:
        raise ValueError(f"unclosed '(' at {depth[-1]} in {expr!r}")
    return names


def dashboard_metric_names(dashboard: dict[str, Any]) -> set[str]:
    return set().union(*(metric_names(expr) for expr in expressions(dashboard)))


def sample_names(exposition: str) -> set[str]:
    """The sample names of a Prometheus text exposition (`name{labels} value` or `name value` lines)."""
    names = set()
    for line in exposition.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names
