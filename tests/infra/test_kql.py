"""Every KQL query of the operator's view parses and analyses with zero errors in Microsoft's Kusto
language service (npm @kusto/language-service-next, pinned in package.json, run by kql_check.cjs).

The analysis is semantic: the queries run against a database holding Application Insights' customMetrics
and customEvents with their real columns and types, so a misspelt column or table, an unknown function
or a type mismatch is an error, not only a syntax error.

The queries: every workbook panel (its parameter placeholders replaced by the literals the workbook puts
there, once for "All" and once for chosen values: operator_view.SUBSTITUTIONS), the workbook's parameter
queries, and every alert rule query of infra/modules/operations.bicep (each a `var <name>Query = '''...'''`).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest

from tests.infra import REPO
from tests.infra.operator_view import (
    KUSTO_PACKAGE,
    OPERATIONS_BICEP,
    SUBSTITUTIONS,
    alert_queries,
    analyse,
    analysed,
    errors,
    every_query,
    load_workbook,
    panels,
    substitute,
)

QUERIES = every_query()


def test_the_queries_were_found() -> None:
    """Panels, parameters and alert rules: an empty list would pass every check below."""
    assert sum(1 for q in QUERIES if q.startswith("workbook panel ")) >= 8 * len(SUBSTITUTIONS)
    assert sum(1 for q in QUERIES if q.startswith("workbook parameter ")) >= 2
    assert sum(1 for q in QUERIES if q.startswith("alert rule query ")) >= 5


@pytest.mark.parametrize("query_id", sorted(QUERIES))
def test_the_query_has_no_error(query_id: str) -> None:
    result = analysed()["results"][query_id]
    problems = errors(result)
    assert not problems, f"{query_id}:\n{QUERIES[query_id]}\n" + "\n".join(problems)


def test_the_language_service_is_the_pinned_version() -> None:
    package = json.loads((REPO / "package.json").read_text(encoding="utf-8"))
    pinned = package["devDependencies"][KUSTO_PACKAGE]
    assert pinned[0].isdigit(), f"{KUSTO_PACKAGE} must be pinned to an exact version, not {pinned!r}"
    assert analysed()["version"] == pinned


BROKEN = {
    'customMetrics | where name == "x" | summarize sum(valueSumm) by bin(timestamp, 5m)': "KS142",
    "customEvents | project timestamp, tostring(customDimension.status)": "KS142",
    "customMetric | take 1": "KS204",
    "customMetrics | summarize sumx(valueSum)": "KS211",
    'customMetrics | project x = coalesce(valueCount, "none")': "KS232",
    "customMetrics | where": None,
    # a placeholder left in the text is not KQL
    "customMetrics | summarize sum(valueSum) by bin(timestamp, {TimeRange:grain})": None,
}


@functools.cache
def broken_results() -> dict[str, Any]:
    results: dict[str, Any] = analyse({query: query for query in BROKEN})["results"]
    return results


@pytest.mark.parametrize("query", sorted(BROKEN))
def test_a_broken_query_is_reported(query: str) -> None:
    """The check would pass vacuously if the service accepted anything (the code None: any error)."""
    found = errors(broken_results()[query])
    assert found, f"no error for {query!r}"
    code = BROKEN[query]
    if code:
        assert any(f.startswith(code + " ") for f in found), found


def test_an_unknown_placeholder_is_not_silently_left() -> None:
    with pytest.raises(KeyError, match=r"\{Tenants\}"):
        substitute("customMetrics | where tenant in ({Tenants})", SUBSTITUTIONS["all"])
    assert substitute("x in ({Tenant}) | bin(t, {TimeRange:grain})", SUBSTITUTIONS["chosen"]) == (
        "x in ('home', 'contoso') | bin(t, 1h)"
    )


def columns(query_id: str) -> dict[str, str]:
    result: dict[str, Any] = analysed()["results"][query_id]
    assert result["columns"] is not None, f"{query_id} does not return a table"
    return {c["name"]: c["type"] for c in result["columns"]}


def test_charts_over_time_have_a_time_axis() -> None:
    for name, content in panels(load_workbook()).items():
        if content.get("visualization") in ("timechart", "barchart", "areachart", "linechart"):
            assert columns(f"workbook panel {name} (all)").get("timestamp") == "datetime", name


@pytest.mark.parametrize("name", sorted(alert_queries(OPERATIONS_BICEP.read_text(encoding="utf-8"))))
def test_an_alert_query_returns_rows_with_a_time_and_a_number(name: str) -> None:
    """A log alert with a measure column aggregates it per window: it needs timestamp and a number."""
    found = columns(f"alert rule query {name}")
    assert found.get("timestamp") == "datetime", found
    assert any(kind in ("real", "long", "int", "decimal") for kind in found.values()), found
