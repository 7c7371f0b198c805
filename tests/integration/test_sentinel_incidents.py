"""POST /api/sentinel/incidents and `{"sentinelIncident": ...}` on the inbound queue, end to end."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from azure.storage.queue import TextBase64EncodePolicy
from azure.storage.queue.aio import QueueClient

from devhost.services import Service
from emulators.control import EmulatorControl
from tests.conftest import HostPool
from tests.integration.helpers import new_ids, post, sent_bodies, wait_for_operation

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sentinel"
MDE_IDS = ["da637551227677560813_-961444813", "ed637431102114129586_160070831"]


def fixture(name: str, *, fresh_ids: bool = True) -> dict[str, Any]:
    """A fixture payload; with fresh MDE ids so that tests sharing the emulator don't see each other."""
    document: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    if fresh_ids:
        text = json.dumps(document)
        for old, new in zip(MDE_IDS, new_ids(2), strict=True):
            text = text.replace(old, new)
        document = json.loads(text)
        resource = document.get("object", document)
        resource["id"] = resource["id"].rsplit("/", 1)[0] + "/" + str(uuid.uuid4())  # a new incident
    return document


def alerts_of(document: dict[str, Any]) -> list[dict[str, Any]]:
    properties = document["object"]["properties"]
    return properties.get("alerts") or properties.get("Alerts") or []


def mde_ids(document: dict[str, Any]) -> list[str]:
    return [
        a["properties"]["providerAlertId"]
        for a in alerts_of(document)
        if a["properties"]["productName"] == "Microsoft Defender Advanced Threat Protection"
    ]


@pytest.mark.parametrize("name", ["closed_false_positive", "closed_false_positive_capital_alerts"])
async def test_a_closed_incident_closes_its_mde_alerts_once(
    name: str, hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    url = hosts.url("/api/sentinel/incidents")
    incident = fixture(name)
    status, headers, body = await post(http, url, incident)
    assert status == 200, body
    assert body["incident"]["number"] == 4711
    assert [a["productName"] for a in body["skippedAlerts"]] == ["Office 365 Advanced Threat Protection"]
    (sent,) = sent_bodies(await ctl.calls())
    assert sent["alertIds"] == mde_ids(incident) and len(sent["alertIds"]) == 2
    assert (sent["status"], sent["classification"], sent["determination"]) == (
        "Resolved",
        "FalsePositive",
        "NotMalicious",
    )
    assert sent["assignedTo"] == "jane.analyst@contoso.onmicrosoft.com"
    assert sent["comment"].startswith('Microsoft Sentinel incident #4711 "')
    assert (
        " Closed as FalsePositive/IncorrectAlertLogic by jane.analyst@contoso.onmicrosoft.com"
        in sent["comment"]
    )
    again = await post(http, url, incident)  # the trigger delivered twice
    assert again[0] == 200 and again[1]["Idempotent-Replayed"] == "true"
    assert again[2]["operationId"] == body["operationId"]
    assert len(await ctl.calls()) == 1
    _, resource = await wait_for_operation(http, headers["Location"])
    assert resource["source"] == "sentinel"


async def test_a_later_change_of_the_same_incident_is_sent(
    hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    url = hosts.url("/api/sentinel/incidents")
    incident = fixture("closed_false_positive")
    assert (await post(http, url, incident))[0] == 200
    reopened = copy.deepcopy(incident)
    reopened["object"]["properties"].update(
        status="Active",
        classification=None,
        classificationReason=None,
        lastModifiedTimeUtc="2024-05-04T10:00:00Z",
    )
    status, _, body = await post(http, url, reopened)
    assert status == 200, body
    first, second = sent_bodies(await ctl.calls())
    assert first["status"] == "Resolved" and second["status"] == "InProgress"


async def test_a_reopened_incident_sets_in_progress(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    incident = fixture("reopened_active")
    status, _, body = await post(http, hosts.url("/api/sentinel/incidents"), incident)
    assert status == 200, body
    (sent,) = sent_bodies(await ctl.calls())
    assert sent["status"] == "InProgress" and sent["alertIds"] == mde_ids(incident)


async def test_no_mde_alert_sends_nothing(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    status, headers, body = await post(http, hosts.url("/api/sentinel/incidents"), fixture("no_mde_alert"))
    assert status == 200 and body["status"] == "NoDefenderAlerts"
    assert "operationId" not in body and "Location" not in headers
    assert len(body["skippedAlerts"]) == 2
    assert await ctl.calls() == []


async def test_alerts_missing_from_the_payload_fail_visibly(
    hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    incident = fixture("defender_portal_no_alerts")
    status, headers, problem = await post(http, hosts.url("/api/sentinel/incidents"), incident)
    assert status == 422 and headers["Content-Type"].startswith("application/problem+json")
    url = incident["object"]["properties"]["additionalData"]["providerIncidentUrl"]
    assert problem["alertsCount"] == 3 and problem["providerIncidentUrl"] == url
    assert "3 alert(s)" in problem["detail"] and url in problem["detail"]
    assert await ctl.calls() == []


async def test_a_bare_incident_resource_is_accepted(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    status, _, body = await post(
        http, hosts.url("/api/sentinel/incidents"), fixture("bare_incident_resource")
    )
    assert status == 200, body
    assert len(await ctl.calls()) == 1


async def test_a_body_that_is_not_an_incident_is_400(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    status, _, problem = await post(http, hosts.url("/api/sentinel/incidents"), {"object": {"properties": 3}})
    assert status == 400 and problem["errors"]
    assert await ctl.calls() == []


async def test_sentinel_mapping_overrides_the_defaults(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    mapping = {
        "FalsePositive/IncorrectAlertLogic": {"classification": "FalsePositive", "determination": "Other"}
    }
    url = hosts.url("/api/sentinel/incidents", SENTINEL_MAPPING=json.dumps(mapping))
    assert (await post(http, url, fixture("closed_false_positive")))[0] == 200
    (sent,) = sent_bodies(await ctl.calls())
    assert (sent["classification"], sent["determination"]) == ("FalsePositive", "Other")


def test_a_bad_sentinel_mapping_stops_the_host(hosts: HostPool) -> None:
    with pytest.raises(RuntimeError) as exc:
        hosts.get(SENTINEL_MAPPING='{"FalsePositive": {"classification": "Benign"}}')
    assert "SENTINEL_MAPPING" in str(exc.value)


async def test_an_incident_from_the_queue(
    hosts: HostPool, azurite: Service, ctl: EmulatorControl, http
) -> None:
    host, env = hosts.fresh(AzureFunctionsJobHost__extensions__queues__maxPollingInterval="00:00:00.300")
    incident = fixture("closed_false_positive_capital_alerts")
    queue = QueueClient.from_connection_string(
        azurite.urls["connection_string"],
        env["REQUESTS_QUEUE"],
        message_encode_policy=TextBase64EncodePolicy(),
    )
    async with queue:
        await queue.send_message(json.dumps({"sentinelIncident": incident}))
        await queue.send_message(json.dumps({"SentinelIncident": incident}))  # redelivered: a replay
        deadline = asyncio.get_running_loop().time() + 15
        while len(await ctl.calls()) < 1:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.2)
        # the copy was handled at the same time (re-enqueued while the first was in progress) or after
        # (a replay at once); either way it ends as a replay that sends nothing
        while "(replay: nothing sent)" not in host.log_path.read_text():
            assert asyncio.get_running_loop().time() < deadline + 10
            await asyncio.sleep(0.2)
    (sent,) = sent_bodies(await ctl.calls())
    assert sent["alertIds"] == mde_ids(incident) and sent["status"] == "Resolved"
    host.stop()
