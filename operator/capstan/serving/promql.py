"""``spec.rollout.analysis.queries``: PromQL templates, checked at admission and filled in per step.

A query is PromQL with ``{{ variable }}`` placeholders and nothing else: the four values are
Kubernetes names, so plain substitution is all a query needs, and no template code written by a
user ever runs inside the operator. Parsing is promql-parser's (the Rust parser behind GreptimeDB,
through its Python bindings), so a query that Prometheus would refuse is refused at admission.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import promql_parser

QUERY_VARIABLES = ("namespace", "name", "revision", "stableRevision")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
# What admission fills in to parse a query: names shaped like the real ones.
_SAMPLE = {"namespace": "default", "name": "example", "revision": "example-0a1b2c3d",
           "stableRevision": "example-4e5f6a7b"}


class QueryError(ValueError):
    """A query template that cannot be filled in or does not parse."""


def render_query(template: str, values: Mapping[str, str]) -> str:
    """``template`` with each ``{{ variable }}`` replaced by its value from ``values``."""

    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            raise QueryError(f"unknown variable {name!r}; known: {', '.join(QUERY_VARIABLES)}")
        return values[name]

    rest = _PLACEHOLDER.sub("", template)
    if "{{" in rest or "{%" in rest:
        raise QueryError("only {{ variable }} placeholders are supported (no template statements)")
    return _PLACEHOLDER.sub(fill, template)


def query_problem(template: str) -> str | None:
    """Why ``template`` cannot be used (None: it renders and parses as PromQL)."""
    try:
        promql_parser.parse(render_query(template, _SAMPLE))
    except QueryError as exc:
        return str(exc)
    except ValueError as exc:  # promql-parser raises ValueError with the parser's message
        return f"not valid PromQL: {exc}"
    return None


@dataclass(frozen=True)
class QueryOutcome:
    """One query's result at the end of a step: ``value``, or why there is none (``problem``)."""

    name: str
    value: float | None = None
    problem: str = ""


def judge_queries(
    queries: Sequence[tuple[str, float | None, float | None]], outcomes: Mapping[str, QueryOutcome]
) -> tuple[str, str]:
    """(verdict, message) of ``queries`` — (name, min, max) each — given their ``outcomes``.

    Fail on the first bound crossed; Inconclusive when a query has no number (no data, NaN, an
    error: the step holds, as an Argo Rollouts analysis does); else Pass.
    """
    passed = []
    for name, low, high in queries:
        out = outcomes.get(name, QueryOutcome(name, problem="not run"))
        if out.value is None or math.isnan(out.value):
            return "Inconclusive", f"query {name}: {out.problem or 'no number (NaN)'}"
        if high is not None and out.value > high:
            return "Fail", f"query {name} = {out.value:g} > {high:g}"
        if low is not None and out.value < low:
            return "Fail", f"query {name} = {out.value:g} < {low:g}"
        passed.append(f"{name} = {out.value:g}")
    return "Pass", ", ".join(passed)


def scalar_of(result: Mapping[str, object]) -> QueryOutcome:
    """The single number in a Prometheus ``/api/v1/query`` answer's ``data`` (name left empty)."""
    kind, value = result.get("resultType"), result.get("result")
    try:
        if kind == "scalar" and isinstance(value, list):
            return QueryOutcome("", float(value[1]))
        if kind == "vector" and isinstance(value, list):
            if not value:
                return QueryOutcome("", problem="no data")
            if len(value) > 1:
                return QueryOutcome("", problem=f"{len(value)} series, one number needed (aggregate it)")
            sample = value[0]
            if isinstance(sample, Mapping) and isinstance(sample.get("value"), list):
                return QueryOutcome("", float(sample["value"][1]))
    except (TypeError, ValueError, IndexError):
        pass
    return QueryOutcome("", problem=f"unexpected result type {kind!r}")
