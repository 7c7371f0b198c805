"""What the tests of the operator's view (the workbook and the alert rules of infra/) share.

- The telemetry contract, read from docs/telemetry.md's tables: every metric with its kind and attributes,
  the event with its attributes. A rename in the document without the workbook or the rules fails them.
- The workbook (infra/workbook/alertgate.workbook.json): its items, panels and parameters, and its queries
  with the workbook's parameter placeholders replaced by literals (see `substitute`).
- The alert rules' queries, read from infra/modules/operations.bicep by its convention: a Bicep multi-line
  string ('''...''') assigned to a `var` whose name ends in `Query`.
- `analyse`: Microsoft's Kusto language service (tests/infra/kql_check.cjs under Node.js) parsing and
  analysing queries against the Application Insights tables.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from tests.infra import REPO

WORKBOOK = REPO / "infra" / "workbook" / "alertgate.workbook.json"
OPERATIONS_BICEP = REPO / "infra" / "modules" / "operations.bicep"
MAIN_BICEP = REPO / "infra" / "main.bicep"
TELEMETRY_DOC = REPO / "docs" / "telemetry.md"
WORKBOOK_SCHEMA = Path(__file__).resolve().parent / "schemas" / "workbook.json"
KQL_CHECK = Path(__file__).resolve().parent / "kql_check.cjs"
KUSTO_PACKAGE = "@kusto/language-service-next"

# --- The telemetry contract (docs/telemetry.md) -------------------------------------------------------------


@dataclass
class Telemetry:
    """What docs/telemetry.md promises: metric name -> kind, figure name -> attributes."""

    metrics: dict[str, str] = field(default_factory=dict)  # counter, histogram or gauge
    events: set[str] = field(default_factory=set)
    attributes: dict[str, set[str]] = field(default_factory=dict)  # metric or event -> its attributes
    shared: set[str] = field(default_factory=set)  # "Attributes shared by most figures"

    @property
    def names(self) -> set[str]:
        return set(self.metrics) | self.events


_CODE = re.compile(r"`([^`]+)`")


def _sections(markdown: str) -> dict[str, str]:
    """Level-two heading -> its text."""
    parts = re.split(r"^## +(.+?)\s*$", markdown, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _table_rows(text: str) -> list[list[str]]:
    """The body rows of every Markdown table in the text, as lists of cells."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if all(re.fullmatch(r":?-+:?", c) for c in cells):
            rows.pop()  # the line above was the header
            continue
        rows.append(cells)
    return rows


def parse_telemetry(markdown: str) -> Telemetry:
    """Read the metric and event tables of docs/telemetry.md (its headings name the kinds)."""
    telemetry = Telemetry()
    for heading, text in _sections(markdown).items():
        lower = heading.lower()
        if lower.startswith("attributes shared"):
            telemetry.shared |= {m.group(1) for row in _table_rows(text) if (m := _CODE.fullmatch(row[0]))}
        elif lower.startswith(("counters", "gauges")):
            for row in _table_rows(text):
                name = _CODE.fullmatch(row[0])
                if not name:
                    continue
                if lower.startswith("gauges"):
                    kind = "gauge"
                else:
                    kind = row[1].split(",")[0].strip().lower()
                    assert kind in ("counter", "histogram"), f"{name.group(1)}: unknown kind {row[1]!r}"
                telemetry.metrics[name.group(1)] = kind
                telemetry.attributes[name.group(1)] = set(_CODE.findall(row[2]))
        elif lower.startswith("the event"):
            events = re.findall(r'name == "([^"]+)"', text)
            assert len(events) == 1, f"section {heading!r} should name one event: {events}"
            telemetry.events.add(events[0])
            telemetry.attributes[events[0]] = {
                m.group(1) for row in _table_rows(text) if (m := _CODE.fullmatch(row[0]))
            }
    return telemetry


@cache
def telemetry() -> Telemetry:
    return parse_telemetry(TELEMETRY_DOC.read_text(encoding="utf-8"))


# A figure's name inside a KQL string literal, and an attribute read from customDimensions.
_NAME_LITERAL = re.compile(r"""["'](alertgate\.[A-Za-z0-9_.]+)["']""")
_ATTRIBUTE = re.compile(r"""customDimensions(?:\.([A-Za-z_]\w*)|\[\s*["']([^"']+)["']\s*\])""")


def names_in(query: str) -> set[str]:
    return set(_NAME_LITERAL.findall(query))


def contract_problems(query: str, contract: Telemetry, *, reads_values: bool = True) -> list[str]:
    """What a query gets wrong about docs/telemetry.md.

    It must name at least one figure, and only documented ones, each in its table (metrics in
    customMetrics, the event in customEvents); read only attributes those figures have (the shared tenant
    and channel may be read from any, for the filters); and, unless it only lists attribute values
    (reads_values False, as the workbook's parameters do), sum a counter's or histogram's valueSum (the
    increase in each interval) and read a gauge's value. It never sums value.
    """
    problems = []
    named = names_in(query)
    if not named:
        problems.append("names no figure of docs/telemetry.md")
    unknown = named - contract.names
    if unknown:
        problems.append(f"names {sorted(unknown)}, not in docs/telemetry.md")
    metrics = {n for n in named if n in contract.metrics}
    events = named & contract.events
    if metrics and "customMetrics" not in query:
        problems.append(f"names the metrics {sorted(metrics)} but does not read customMetrics")
    if events and "customEvents" not in query:
        problems.append(f"names the events {sorted(events)} but does not read customEvents")
    allowed = set(contract.shared)
    for name in named & contract.names:
        allowed |= contract.attributes.get(name, set())
    read = {a or b for a, b in _ATTRIBUTE.findall(query)}
    if read - allowed:
        problems.append(f"reads the attributes {sorted(read - allowed)}, which none of {sorted(named)} has")
    deltas = {n for n in metrics if contract.metrics[n] in ("counter", "histogram")}
    gauges = {n for n in metrics if contract.metrics[n] == "gauge"}
    if reads_values and deltas and "valueSum" not in query:
        problems.append(f"does not sum valueSum of the counters {sorted(deltas)}")
    if reads_values and gauges and not re.search(r"\bvalue\b", query):
        problems.append(f"does not read value of the gauges {sorted(gauges)}")
    if re.search(r"\bsum\s*\(\s*value\s*\)", query):
        problems.append("sums value: counters are summed by valueSum, gauges are not summed")
    return problems


# --- The workbook ----------------------------------------------------------------------------------------------


def load_workbook() -> dict[str, Any]:
    workbook: dict[str, Any] = json.loads(WORKBOOK.read_text(encoding="utf-8"))
    return workbook


def items(workbook: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every item, those inside groups (type 12) included."""
    for item in workbook.get("items", []):
        yield item
        if item.get("type") == 12:
            yield from items(item["content"])


def panels(workbook: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Query items (type 3) by name -> their content."""
    found: dict[str, dict[str, Any]] = {}
    for item in items(workbook):
        if item.get("type") == 3:
            assert item["name"] not in found, f"two panels are named {item['name']!r}"
            found[item["name"]] = item["content"]
    return found


def parameters(workbook: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Parameters of every parameter item (type 9), by name."""
    return {
        parameter["name"]: parameter
        for item in items(workbook)
        if item.get("type") == 9
        for parameter in item["content"]["parameters"]
    }


# A workbook parameter in a query: {Name} or {Name:format}, as the workbook replaces it before it runs.
PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)(?::([A-Za-z]\w*))?\}")

# What the workbook puts in place of each placeholder: the multi-select parameters (quote ', delimiter ,)
# become a list of quoted values, or '*' (selectAllValue) when All is chosen; {TimeRange:grain} becomes a
# timespan. Each query is parsed with each of these sets.
SUBSTITUTIONS: dict[str, dict[str, str]] = {
    "all": {"Tenant": "'*'", "Channel": "'*'", "TimeRange:grain": "5m"},
    "chosen": {"Tenant": "'home', 'contoso'", "Channel": "'batchUpdate'", "TimeRange:grain": "1h"},
}


def substitute(query: str, values: Mapping[str, str]) -> str:
    """The query as the workbook runs it with these parameter values; an unknown placeholder is an error."""

    def replace(match: re.Match[str]) -> str:
        key = match.group(0)[1:-1]
        if key not in values:
            raise KeyError(f"no literal for the placeholder {match.group(0)} (add it to SUBSTITUTIONS)")
        return values[key]

    return PLACEHOLDER.sub(replace, query)


# --- The alert rules (infra/modules/operations.bicep) ----------------------------------------------------------

_QUERY_VAR = re.compile(r"^var[ \t]+(\w+Query)[ \t]*=[ \t]*'''\n?(.*?)'''", re.MULTILINE | re.DOTALL)


def alert_queries(bicep: str) -> dict[str, str]:
    """`var <name>Query = '''...'''` -> the query text (Bicep drops a newline right after the opening ''')."""
    return {name: text for name, text in _QUERY_VAR.findall(bicep)}


# --- The Kusto language service ---------------------------------------------------------------------------------


def node() -> str:
    """Node.js as scripts/bootstrap.sh requires it: on PATH."""
    found = shutil.which("node")
    assert found, "Node.js is needed for the KQL checks (scripts/bootstrap.sh installs the rest)"
    return found


def analyse(queries: Mapping[str, str]) -> dict[str, Any]:
    """Run kql_check.cjs over the queries: {"version": ..., "results": {id: {"diagnostics", "columns"}}}."""
    package = REPO / "node_modules" / KUSTO_PACKAGE / "package.json"
    assert package.exists(), f"{KUSTO_PACKAGE} is not installed in node_modules/: run scripts/bootstrap.sh"
    done = subprocess.run(
        [node(), str(KQL_CHECK)],
        cwd=REPO,
        input=json.dumps({"queries": [{"id": k, "text": v} for k, v in queries.items()]}),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "NODE_OPTIONS": ""},
    )
    assert done.returncode == 0, f"kql_check.cjs failed:\n{done.stderr}"
    answer: dict[str, Any] = json.loads(done.stdout)
    return {"version": answer["version"], "results": {r["id"]: r for r in answer["results"]}}


def errors(result: Mapping[str, Any]) -> list[str]:
    return [
        f"{d['code']} at {d['start']}: {d['message']}"
        for d in result["diagnostics"]
        if d["severity"] == "Error"
    ]


def every_query() -> dict[str, str]:
    """Every KQL query of the operator's view, by an id that says where it is, placeholders replaced."""
    workbook = load_workbook()
    queries: dict[str, str] = {}
    for name, content in panels(workbook).items():
        for variant, values in SUBSTITUTIONS.items():
            queries[f"workbook panel {name} ({variant})"] = substitute(content["query"], values)
    for name, parameter in parameters(workbook).items():
        if "query" in parameter:
            queries[f"workbook parameter {name}"] = substitute(parameter["query"], SUBSTITUTIONS["all"])
    for name, text in alert_queries(OPERATIONS_BICEP.read_text(encoding="utf-8")).items():
        queries[f"alert rule query {name}"] = text
    return queries


@cache
def analysed() -> dict[str, Any]:
    """The analysis of every_query(), run once per test session."""
    return analyse(every_query())
