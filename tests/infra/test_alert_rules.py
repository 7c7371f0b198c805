"""The alert rules of infra/modules/operations.bicep page on exactly what the operator needs, query only
what docs/telemetry.md promises, and are wired into main.bicep with their parameters.

Bicep cannot be compiled here, so the module is read as text by its stated conventions: each rule's KQL
is a `var <name>Query = '''...'''` and the rules are the objects of `var rules = [...]`, one per rule, with
one `key: value` per line. (Whether the queries are valid KQL is tests/infra/test_kql.py's business.)
"""

from __future__ import annotations

import re

import pytest

from tests.infra.operator_view import (
    MAIN_BICEP,
    OPERATIONS_BICEP,
    alert_queries,
    contract_problems,
    telemetry,
)
from tests.infra.test_settings_consistency import (
    PARAMETERS_JSON,
    bicep_block,
    bicep_code,
    bicep_param_defaults,
)

BICEP = OPERATIONS_BICEP.read_text(encoding="utf-8")
QUERIES = alert_queries(BICEP)


_STRING = re.compile(r"'(?:[^'\\\n]|\\.)*'")


def _depth_change(text: str) -> int:
    """How much the text opens `{`/`[` minus what it closes, string literals left out."""
    code = _STRING.sub("''", text)
    return code.count("{") + code.count("[") - code.count("}") - code.count("]")


def top_level_objects(array: str) -> list[str]:
    """The text of each `{...}` directly inside a Bicep array, line by line (one `{` or `}` a line)."""
    objects: list[str] = []
    current: list[str] = []
    depth = 0
    for line in array.splitlines():
        change = _depth_change(line)
        if depth == 0 and change > 0:
            current = []
        elif depth + change == 0 and depth > 0:
            objects.append("\n".join(current))
        else:
            current.append(line)
        depth += change
    assert depth == 0, "unbalanced rules array"
    return objects


def top_level_properties(obj: str) -> dict[str, str]:
    """`key: value` lines at the object's own level (nested arrays and objects are left out)."""
    out: dict[str, str] = {}
    depth = 0
    for line in obj.splitlines():
        if depth == 0:
            match = re.match(r"^\s*(\w+)\s*:\s*(.*?)\s*$", line)
            if match:
                out[match.group(1)] = match.group(2)
        depth += _depth_change(line)
    return out


def rules() -> dict[str, dict[str, str]]:
    """The rules by the query variable they use, from `var rules = [...]` (with its string literals)."""
    found: dict[str, dict[str, str]] = {}
    for obj in top_level_objects(bicep_block(OPERATIONS_BICEP, "rules", "[")):
        properties = top_level_properties(obj)
        query = properties.get("query", "")
        assert query not in found, f"two rules use {query}"
        found[query] = properties
    return found


def test_the_queries_are_found_and_each_is_one_rule_s() -> None:
    assert QUERIES, "no `var <name>Query = '''...'''` in operations.bicep: the KQL tests would check nothing"
    assert set(rules()) == set(QUERIES), "every rule uses one query variable, and every query one rule"


def test_no_query_is_written_inline() -> None:
    """An inline `query: '...'` would escape the KQL tests."""
    code = bicep_code(BICEP, keep_strings=False)
    values = re.findall(r"^\s*query\s*:\s*(.+?)\s*$", code, re.MULTILINE)
    assert values, "no query property"
    for value in values:
        assert value == "rule.query" or value in QUERIES, f"query: {value} is not one of the *Query variables"


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_the_query_names_only_documented_figures(name: str) -> None:
    assert not contract_problems(QUERIES[name], telemetry())


@pytest.mark.parametrize(
    ("figure", "condition"),
    [
        ("alertgate.mde.forbidden", None),
        ("alertgate.poison.messages", None),
        ("alertgate.backlog.oldest_age", None),
        ("alertgate.chunks.ended", 'tostring(customDimensions.result) == "OutcomeUnknown"'),
        ("alertgate.mde.calls", 'tostring(customDimensions.outcome) == "429"'),
    ],
)
def test_each_required_alert_has_its_rule(figure: str, condition: str | None) -> None:
    matching = [n for n, q in QUERIES.items() if f'"{figure}"' in q and (condition is None or condition in q)]
    assert len(matching) == 1, f"one rule on {figure} {condition or ''}: {matching}"


def test_thresholds_aggregations_and_periods() -> None:
    # each rule by the first figure its query names
    by_figure = {re.findall(r'"(alertgate\.[\w.]+)"', QUERIES[q])[0]: p for q, p in rules().items()}
    assert len(by_figure) == len(rules())
    # every rule: above its threshold, one measure column; the 429 rule needs 3 failing windows of 3
    for figure, rule in by_figure.items():
        assert rule["metricMeasureColumn"].strip("'") in QUERIES[rule["query"]], figure
        expected_periods = "3" if figure == "alertgate.mde.calls" else "1"
        assert rule["periods"] == expected_periods, f"{figure}: periods {rule['periods']}"
        if figure == "alertgate.backlog.oldest_age":
            assert rule["threshold"] == "oldestPendingAlertMinutes * 60"
            assert rule["timeAggregation"] == "'Maximum'"
        else:
            assert rule["threshold"] == "0", f"{figure}: any occurrence alerts"
    assert "alertgate.queue.depth" in QUERIES[by_figure["alertgate.poison.messages"]["query"]]
    resource = bicep_code(BICEP, keep_strings=True)
    assert "numberOfEvaluationPeriods: rule.periods" in resource
    assert "minFailingPeriodsToAlert: rule.periods" in resource
    assert re.search(
        r"'Microsoft\.Insights/scheduledQueryRules@2022-06-15' = \[\s*for rule in rules:", resource
    )


def test_the_rules_are_scoped_to_the_component_and_take_the_action_group() -> None:
    code = bicep_code(BICEP, keep_strings=True)
    assert re.search(r"scopes:\s*\[\s*applicationInsights\.id\s*\]", code)
    assert "var actionGroups = empty(actionGroupId) ? [] : [" in code
    assert re.search(r"actions:\s*\{\s*actionGroups:\s*actionGroups\s*\}", code)
    assert bicep_param_defaults(OPERATIONS_BICEP)["actionGroupId"] == ""


def test_main_bicep_deploys_the_module_with_its_parameters() -> None:
    defaults = bicep_param_defaults(MAIN_BICEP)
    assert defaults["alertActionGroupId"] == ""
    assert defaults["oldestPendingAlertMinutes"] == 15
    assert bicep_param_defaults(OPERATIONS_BICEP)["oldestPendingAlertMinutes"] == 15
    code = bicep_code(MAIN_BICEP.read_text(encoding="utf-8"), keep_strings=True)
    module = re.search(r"^module operations 'modules/operations\.bicep' = \{(.*?)^\}", code, re.S | re.M)
    assert module, "main.bicep does not deploy modules/operations.bicep"
    for line in (
        "applicationInsightsName: monitoring.outputs.applicationInsightsName",
        "actionGroupId: alertActionGroupId",
        "oldestPendingAlertMinutes: oldestPendingAlertMinutes",
    ):
        assert line in module.group(1), f"the module is not given `{line}`"
    parameters = PARAMETERS_JSON.read_text(encoding="utf-8")
    assert '"alertActionGroupId": { "value": "${ALERTGATE_ALERT_ACTION_GROUP_ID=}" }' in parameters
    assert (
        '"oldestPendingAlertMinutes": { "value": "${ALERTGATE_OLDEST_PENDING_ALERT_MINUTES=15}" }'
        in parameters
    )


def test_every_parameter_of_the_module_is_described() -> None:
    code = bicep_code(BICEP, keep_strings=True)
    params = re.findall(r"^param\s+(\w+)", code, re.MULTILINE)
    described = re.findall(r"@description\('(?:[^'\\]|\\.)*'\)\n(?:@\w+\([^)]*\)\n)*param\s+(\w+)", code)
    assert params and params == described
