"""The README's "Operating alertgate" names every metric and event of docs/telemetry.md, every workbook
panel (by its title) and every alert rule (by its name), so an operator finds each explained there."""

from __future__ import annotations

import re

from tests.infra import REPO
from tests.infra.operator_view import OPERATIONS_BICEP, load_workbook, panels, telemetry

RULE_NAME = re.compile(r"^    name: '([a-z0-9-]+)'$", re.MULTILINE)


def operating_section() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Operating alertgate\n")
    end = readme.index("\n## ", start + 1)
    return readme[start:end]


def test_every_metric_and_event_is_named() -> None:
    section = operating_section()
    missing = sorted(name for name in telemetry().names if f"`{name}`" not in section)
    assert telemetry().names and missing == []


def test_every_workbook_panel_is_named_by_its_title() -> None:
    section = operating_section()
    titles = [str(content.get("title", "")) for content in panels(load_workbook()).values()]
    missing = [title for title in titles if f'"{title}"' not in section]
    assert titles and missing == []


def test_every_alert_rule_is_named() -> None:
    section = operating_section()
    rules = RULE_NAME.findall(OPERATIONS_BICEP.read_text(encoding="utf-8"))
    missing = [rule for rule in rules if f"`{rule}`" not in section]
    assert len(rules) == 5 and missing == []
