"""Every PromQL query in the generated dashboards, ready to send to a Prometheus.

For the dashboard-query test (a real Prometheus that scraped a running demo) and for the unit test that
every metric a panel names is one the code exports:

    from dashboards.promql import committed_queries
    for query in committed_queries():
        expr = query.promql()          # Grafana variables replaced by their defaults ("All" = .*)
        ...                            # GET /api/v1/query?query=expr, fail on an error

Needs only the JSON (charts/moe-operator/dashboards/*.json), not grafana-foundation-sdk.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import OUT_DIR

# Grafana's built-in variables, with values that are valid for any Prometheus scraping every 15-30 s.
BUILTINS = {
    "__rate_interval": "2m",
    "__interval": "30s",
    "__interval_ms": "30000",
    "__range": "10m",
    "__range_s": "600",
    "__range_ms": "600000",
}

_VAR = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.S)


@dataclass(frozen=True)
class Query:
    """One query of one dashboard: a panel target, an annotation, or a variable's series selector."""

    dashboard: str  # file name, e.g. moe-experts.json
    panel: str  # panel title, "annotation: NAME" or "variable: NAME"
    ref: str  # refId of the target ("" for annotations and variables)
    expr: str  # as stored in the dashboard, with Grafana variables
    instant: bool
    defaults: tuple[tuple[str, str], ...]  # the dashboard's variable defaults

    def promql(self, overrides: Mapping[str, str] | None = None) -> str:
        """The query with every $variable replaced: `overrides`, else the dashboard default, else a built-in."""
        values = {**BUILTINS, **dict(self.defaults), **(overrides or {})}
        return substitute(self.expr, values)

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel} [{self.ref}]: {self.expr}"


def substitute(expr: str, values: Mapping[str, str]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in: {expr}")
        return values[name]

    return _VAR.sub(repl, expr)


def variable_defaults(doc: dict) -> dict[str, str]:
    """Default value of each template variable: "All" -> its allValue, a text box -> its text."""
    out: dict[str, str] = {}
    for v in (doc.get("templating") or {}).get("list") or []:
        name, kind = v["name"], v.get("type")
        if kind == "datasource":
            continue
        current = (v.get("current") or {}).get("value")
        if kind == "query" and (current in (None, "", "$__all") or current == ["$__all"]):
            out[name] = v.get("allValue") or ".*"
        elif kind in ("textbox", "constant", "custom"):
            out[name] = str(current if current not in (None, "") else v.get("query", ""))
        else:
            out[name] = str(current if isinstance(current, str) else ".*")
    return out


def _panels(doc: dict) -> Iterator[dict]:
    for p in doc.get("panels") or []:
        yield p
        yield from p.get("panels") or []  # collapsed rows keep their panels inside


def dashboard_queries(doc: dict, name: str = "") -> list[Query]:
    defaults = tuple(sorted(variable_defaults(doc).items()))
    out = []
    for p in _panels(doc):
        for t in p.get("targets") or []:
            if t.get("expr") and not t.get("hide"):
                out.append(Query(name, p.get("title", ""), t.get("refId", ""), t["expr"],
                                 bool(t.get("instant")) and not t.get("range"), defaults))
    for a in (doc.get("annotations") or {}).get("list") or []:
        if a.get("expr"):
            out.append(Query(name, f"annotation: {a.get('name', '')}", "", a["expr"], False, defaults))
    for v in (doc.get("templating") or {}).get("list") or []:
        query = v.get("query")
        if v.get("type") == "query" and isinstance(query, str):
            m = _LABEL_VALUES.match(query)
            if m:  # label_values(SELECTOR, label): the selector is PromQL
                out.append(Query(name, f"variable: {v['name']}", "", m.group(1), True, defaults))
    return out


def committed_queries(directory: Path = OUT_DIR) -> list[Query]:
    """Every query of every dashboard the chart ships."""
    out = []
    for path in sorted(directory.glob("*.json")):
        out.extend(dashboard_queries(json.loads(path.read_text()), path.name))
    return out


# --- metric names ---------------------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and label names excluded).

    Grafana variables are replaced first so `$__rate_interval` and friends do not read as names.
    """
    e = _VAR.sub("0", expr)
    e = _STRING.sub('""', e)
    e = _BRACES.sub("", e)  # label matchers (after strings, so a '}' inside a regex cannot confuse it)
    e = _RANGE.sub("", e)  # [5m], [1h:1m]
    e = _LABEL_LIST.sub("", e)  # by (a, b), on (...), group_left (...)
    names = set()
    for m in _IDENT.finditer(e):
        ident, call = m.group(1), m.group(2)
        if call or ident.lower() in _KEYWORDS:
            continue
        if re.fullmatch(r"\d+(\.\d+)?(e[+-]?\d+)?", ident, re.I):
            continue
        names.add(ident)
    return names
