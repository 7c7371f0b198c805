"""The operator's workbook (infra/workbook/alertgate.workbook.json) is a valid workbook over the telemetry
docs/telemetry.md promises, with working tenant, channel and time range filters.

- It validates against Microsoft's published workbook schema, vendored in tests/infra/schemas/ (its
  README says where from).
- Every panel's query names only the metric and event names of docs/telemetry.md's tables, read only
  their attributes, and treats counters as deltas (valueSum) and gauges as last values (value); the
  workbook shows every documented figure. A rename in the document without the workbook fails here.
- The Tenant and Channel parameters are multi-select with "All", filled from customMetrics'
  customDimensions, and every panel uses them and the TimeRange parameter.
- infra/modules/operations.bicep deploys exactly this file.

Whether the queries are valid KQL is tests/infra/test_kql.py's business.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from jsonschema import Draft7Validator  # type: ignore[import-untyped]

from tests.infra.operator_view import (
    OPERATIONS_BICEP,
    TELEMETRY_DOC,
    WORKBOOK,
    WORKBOOK_SCHEMA,
    contract_problems,
    items,
    load_workbook,
    names_in,
    panels,
    parameters,
    parse_telemetry,
    telemetry,
)

# loadTextContent reads at most this many characters (Bicep's limit).
LOAD_TEXT_CONTENT_LIMIT = 131072


@pytest.fixture(scope="module")
def workbook() -> dict[str, Any]:
    return load_workbook()


@pytest.fixture(scope="module")
def validator() -> Draft7Validator:
    schema = json.loads(WORKBOOK_SCHEMA.read_text(encoding="utf-8"))
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def test_the_workbook_validates_against_the_published_schema(
    workbook: dict[str, Any], validator: Draft7Validator
) -> None:
    problems = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(workbook)
    ]
    assert not problems, "\n".join(problems)
    assert workbook["version"] == "Notebook/1.0"


@pytest.mark.parametrize(
    "breakage",
    ["no version", "a query that is not a string", "an unknown item type", "a size that is not a number"],
)
def test_the_schema_rejects_a_broken_workbook(
    workbook: dict[str, Any], validator: Draft7Validator, breakage: str
) -> None:
    """The check above would pass vacuously if the schema accepted anything."""
    broken = copy.deepcopy(workbook)
    panel = next(item for item in broken["items"] if item["type"] == 3)
    if breakage == "no version":
        del broken["version"]
    elif breakage == "a query that is not a string":
        panel["content"]["query"] = ["customMetrics"]
    elif breakage == "an unknown item type":
        panel["type"] = 99
    else:
        panel["content"]["size"] = "large"
    assert not validator.is_valid(broken)


def test_the_vendored_schema_says_where_it_came_from() -> None:
    readme = (WORKBOOK_SCHEMA.parent / "README.md").read_text(encoding="utf-8")
    assert "microsoft/Application-Insights-Workbooks" in readme
    assert "schema/workbook.json" in readme
    assert re.search(r"\b[0-9a-f]{40}\b", readme), "the README names the commit"


def test_operations_bicep_deploys_this_file() -> None:
    bicep = OPERATIONS_BICEP.read_text(encoding="utf-8")
    loaded = re.findall(r"loadTextContent\('([^']+)'\)", bicep)
    assert loaded == ["../workbook/alertgate.workbook.json"]
    assert (OPERATIONS_BICEP.parent / loaded[0]).resolve() == WORKBOOK.resolve()
    assert "'Microsoft.Insights/workbooks@" in bicep
    # the template points the workbook at the component it deploys to; a copied resource id would not
    assert "fallbackResourceIds" not in load_workbook() and "/subscriptions/" not in WORKBOOK.read_text(
        encoding="utf-8"
    )
    assert re.search(r"fallbackResourceIds:\s*\[\s*applicationInsights\.id\s*\]", bicep)
    size = len(WORKBOOK.read_text(encoding="utf-8"))
    assert size < LOAD_TEXT_CONTENT_LIMIT, f"{size} characters: over loadTextContent's limit"


# --- The contract of docs/telemetry.md --------------------------------------------------------------------


def test_docs_telemetry_md_tables_are_read() -> None:
    """The reading of the document found every table (or the checks below would check nothing)."""
    contract = telemetry()
    kinds = set(contract.metrics.values())
    assert len(contract.metrics) >= 10 and kinds == {"counter", "histogram", "gauge"}, contract.metrics
    assert contract.events == {"alertgate.operation.ended"}
    assert contract.shared == {"tenant", "channel"}
    assert contract.attributes["alertgate.mde.calls"] >= {"outcome", "error_code"}
    assert contract.attributes["alertgate.operation.ended"] >= {"status", "errorCode", "operationId"}


def test_every_panel_queries_only_documented_names_and_attributes(workbook: dict[str, Any]) -> None:
    contract = telemetry()
    problems = [
        f"{name}: {problem}"
        for name, content in panels(workbook).items()
        for problem in contract_problems(content["query"], contract)
    ]
    assert not problems, "\n".join(problems)


def test_the_workbook_shows_every_documented_figure(workbook: dict[str, Any]) -> None:
    shown = set().union(*(names_in(c["query"]) for c in panels(workbook).values()))
    assert shown == telemetry().names, f"no panel for {sorted(telemetry().names - shown)}"


def test_a_name_renamed_in_the_document_only_fails_the_check(workbook: dict[str, Any]) -> None:
    renamed = parse_telemetry(
        TELEMETRY_DOC.read_text(encoding="utf-8").replace("alertgate.budget.used", "alertgate.budget.spent")
    )
    assert "alertgate.budget.spent" in renamed.metrics
    problems = [p for c in panels(workbook).values() for p in contract_problems(c["query"], renamed)]
    assert any("'alertgate.budget.used'" in p and "not in docs/telemetry.md" in p for p in problems), problems


def test_a_counter_summed_by_value_or_an_unknown_attribute_fails_the_check() -> None:
    contract = telemetry()
    assert contract_problems(
        'customMetrics | where name == "alertgate.chunks.ended" | summarize sum(value)', contract
    )
    assert contract_problems(
        'customMetrics | where name == "alertgate.backlog.pending" '
        "| summarize max(value) by tostring(customDimensions.outcome)",
        contract,
    )
    assert not contract_problems(
        'customMetrics | where name == "alertgate.chunks.ended" '
        "| summarize sum(valueSum) by tostring(customDimensions.result)",
        contract,
    )


# --- Parameters and panels ----------------------------------------------------------------------------------


def test_the_time_range_parameter_drives_every_panel(workbook: dict[str, Any]) -> None:
    time_range = parameters(workbook)["TimeRange"]
    assert time_range["type"] == 4 and time_range["isRequired"] is True
    for name, content in panels(workbook).items():
        assert content.get("timeContextFromParameter") == "TimeRange", f"{name} ignores the time range"


@pytest.mark.parametrize(("name", "attribute"), [("Tenant", "tenant"), ("Channel", "channel")])
def test_tenant_and_channel_are_multi_select_with_all_from_custom_dimensions(
    workbook: dict[str, Any], name: str, attribute: str
) -> None:
    parameter = parameters(workbook)[name]
    assert parameter["type"] == 2 and parameter["multiSelect"] is True
    assert parameter["quote"] == "'" and parameter["delimiter"] == ","
    settings = parameter["typeSettings"]
    assert settings["additionalResourceOptions"] == ["value::all"] and settings["selectAllValue"] == "*"
    assert parameter["value"] == ["value::all"], "All is the default"
    query = parameter["query"]
    assert query.startswith("customMetrics") and f"customDimensions.{attribute}" in query
    assert parameter["timeContextFromParameter"] == "TimeRange"
    assert not contract_problems(query, telemetry(), reads_values=False)


def test_every_panel_is_filtered_by_tenant_and_channel(workbook: dict[str, Any]) -> None:
    """'*' is the parameter's value when All is chosen; a figure without the attribute is not narrowed."""
    found = panels(workbook)
    assert len(found) >= 8
    for name, content in found.items():
        query = content["query"]
        for parameter, attribute in (("Tenant", "tenant"), ("Channel", "channel")):
            idiom = f"'*' in ({{{parameter}}}) or {attribute} in ({{{parameter}}})"
            reads = len(re.findall(r"\b(?:customMetrics|customEvents)\b", query))
            assert query.count(idiom) == reads, f"{name}: every table read must be filtered with `{idiom}`"
            assert idiom in query, f"{name} does not use {{{parameter}}}"


def test_every_panel_reads_the_application_insights_component(workbook: dict[str, Any]) -> None:
    for name, content in panels(workbook).items():
        assert content["queryType"] == 0, f"{name}: not a log query"
        assert content["resourceType"] == "microsoft.insights/components", name
        assert content.get("title"), f"{name} has no title"
    assert all(item.get("name") for item in items(workbook)), "every item has a name"
