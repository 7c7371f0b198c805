"""POST /api/alerts/batchUpdate end to end: development host → real azure-identity and aiohttp → emulators.

Nothing of alertgate is patched: the app runs in its own host process with its settings from the
environment, gets its token from the identity emulator through ManagedIdentityCredential, and calls the
MDE emulator over loopback. Assertions read what the emulator recorded.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from emulators.control import EmulatorControl
from tests.conftest import HostPool
from tests.examples import ID1, ID2, MICROSOFT_EXAMPLE
from tests.integration.helpers import post, sent_bodies, wait_for_operation

IDS = [f"da6373997940502735{i:02d}_{1000 + i}" for i in range(10)]
MDE_RESOURCE = "https://api.securitycenter.microsoft.com"
# A synchronous wait long enough for several calls on a busy 2-core machine (the default test host waits 2 s).
BUSY_WAIT = "15"


async def test_microsoft_example_is_forwarded_exactly(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    status, _, body = await post(http, hosts.url("/api/alerts/batchUpdate"), MICROSOFT_EXAMPLE)
    assert status == 200, body
    assert body["status"] == "Succeeded" and body["alertCount"] == 2
    calls = await ctl.calls()
    assert len(calls) == 1
    assert calls[0]["status"] == 200
    # exactly the canonical body, compact, in MDE's spelling and order
    assert calls[0]["body"] == json.dumps(MICROSOFT_EXAMPLE, separators=(",", ":"))
    assert calls[0]["authorization"].startswith("Bearer ")
    alert = await ctl.alert(ID1)
    assert alert is not None and alert["status"] == "Resolved"
    assert alert["comments"] == ["Resolve my alert and assign to secop2"]


async def test_the_token_comes_from_the_identity_endpoint_for_mde(
    hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    url = hosts.url("/api/alerts/batchUpdate", TEST_HOST="fresh-token")
    await ctl.configure(acceptedAudiences=[MDE_RESOURCE])
    status, _, _ = await post(http, url, {"alertIds": [ID1], "status": "InProgress"})
    assert status == 200
    requests = await ctl.token_requests()
    assert [r["resource"] for r in requests] == [MDE_RESOURCE]
    # a token for any other audience would be refused by the emulator
    await ctl.configure(acceptedAudiences=["https://graph.microsoft.com"])
    status, _, body = await post(http, url, {"alertIds": [ID1], "status": "New"})
    assert status == 502 and body["upstream"]["httpStatus"] == 401


async def test_one_token_request_serves_many_calls(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    url = hosts.url("/api/alerts/batchUpdate", TEST_HOST="token-reuse")
    for i in range(6):
        status, _, _ = await post(http, url, {"alertIds": [IDS[i]], "status": "InProgress"})
        assert status == 200
    assert len(await ctl.calls()) == 6
    assert len(await ctl.token_requests()) == 1


async def test_names_and_values_are_matched_case_insensitively(
    hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    given = {
        "AlertIDs": [ID1, ID1, ID2],
        "STATUS": "resolved",
        "classification": "informational, expected activity",
        "Determination": "confirmeduseractivity",
        "assignedto": "analyst@contoso.com",
    }
    status, _, body = await post(http, hosts.url("/api/alerts/batchUpdate"), given)
    assert status == 200, body
    (sent,) = sent_bodies(await ctl.calls())
    assert sent == {
        "alertIds": [ID1, ID2],
        "status": "Resolved",
        "assignedTo": "analyst@contoso.com",
        "classification": "InformationalExpectedActivity",
        "determination": "ConfirmedActivity",
    }
    assert list(sent) == ["alertIds", "status", "assignedTo", "classification", "determination"]


async def test_enum_overrides_change_the_outbound_spelling(
    hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    url = hosts.url("/api/alerts/batchUpdate", DEFENDER_ENUM_OVERRIDES='{"NotMalicious": "Clean"}')
    await ctl.configure(extraDeterminations=["Clean"])
    status, _, body = await post(http, url, {"alertIds": [ID1], "determination": "NotMalicious"})
    assert status == 200, body
    assert sent_bodies(await ctl.calls()) == [{"alertIds": [ID1], "determination": "Clean"}]


async def test_chunks_hold_at_most_the_configured_number_of_ids(
    hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    # several calls in one synchronous wait: room for a busy machine, or the rest goes on after the test
    url = hosts.url(
        "/api/alerts/batchUpdate", DEFENDER_MAX_ALERTS_PER_CALL="2", SYNC_MAX_WAIT_SECONDS=BUSY_WAIT
    )
    status, _, body = await post(http, url, {"alertIds": IDS[:5], "status": "Resolved"})
    assert status == 200, body
    sent = sent_bodies(await ctl.calls())
    assert [b["alertIds"] for b in sent] == [IDS[0:2], IDS[2:4], IDS[4:5]]
    assert all(b["status"] == "Resolved" for b in sent)
    assert [c["status"] for c in body["chunks"]] == ["Succeeded"] * 3


async def test_maximum_batch_size_exceeded_splits_and_is_remembered(
    hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    # four calls and a split in one synchronous wait: room for a busy machine, or the rest of the request
    # goes on after the test and takes the next test's scripted fault
    settings = {"DEFENDER_MAX_ALERTS_PER_CALL": "10", "SYNC_MAX_WAIT_SECONDS": BUSY_WAIT}
    url = hosts.url("/api/alerts/batchUpdate", **settings)
    await ctl.configure(maxBatch=3)
    status, _, body = await post(http, url, {"alertIds": IDS[:7], "status": "Resolved"})
    assert status == 200, body
    calls = await ctl.calls()
    assert [c["status"] for c in calls] == [400, 200, 200, 200]
    assert [len(b["alertIds"]) for b in sent_bodies(calls)] == [7, 3, 3, 1]
    # the next request uses the learned limit at once: no further refusal
    status, _, body = await post(http, url, {"alertIds": IDS[3:10], "status": "InProgress"})
    assert status == 200, body
    later = (await ctl.calls())[4:]
    assert [c["status"] for c in later] == [200, 200, 200]
    assert sorted(i for b in sent_bodies(later) for i in b["alertIds"]) == sorted(IDS[3:10])
    async with http.get(hosts.url("/api/health", **settings)) as response:
        assert (await response.json())["defender"]["maxAlertsPerCall"] == 3


async def test_upstream_400_is_422_with_mdes_error(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    await ctl.add_faults([{"status": 400, "code": "InvalidInput", "message": "Invalid alert state"}])
    status, headers, body = await post(http, hosts.url("/api/alerts/batchUpdate"), MICROSOFT_EXAMPLE)
    assert status == 422
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["upstream"]["code"] == "InvalidInput"
    assert body["upstream"]["message"] == "Invalid alert state"
    assert body["upstream"]["target"]  # MDE's correlation id, for Microsoft support
    assert len(await ctl.calls()) == 1


async def test_upstream_404_for_an_unknown_alert_is_422(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    await ctl.configure(unknownIds=[ID2])
    status, _, body = await post(http, hosts.url("/api/alerts/batchUpdate"), MICROSOFT_EXAMPLE)
    assert status == 422
    assert body["upstream"]["httpStatus"] == 404 and body["upstream"]["code"] == "NotFound"
    assert ID2 in body["upstream"]["message"]


async def test_mixed_chunks_answer_the_most_severe(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    url = hosts.url("/api/alerts/batchUpdate", DEFENDER_MAX_ALERTS_PER_CALL="1")
    await ctl.configure(unknownIds=[ID2])
    status, _, body = await post(http, url, {"alertIds": [ID1, ID2], "status": "Resolved"})
    assert status == 422
    assert [c["status"] for c in body["chunks"]] == ["Succeeded", "Failed"]
    assert body["succeededAlertCount"] == 1
    assert (await ctl.alert(ID1) or {}).get("status") == "Resolved"


async def test_401_is_retried_once_with_a_fresh_token(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    url = hosts.url("/api/alerts/batchUpdate", TEST_HOST="revoked-token")
    assert (await post(http, url, {"alertIds": [ID1], "status": "New"}))[0] == 200
    # revoke only this host's token: other hosts in the session share the emulator
    await ctl.revoke_tokens([(await ctl.calls())[0]["authorization"].removeprefix("Bearer ")])
    status, _, body = await post(http, url, {"alertIds": [ID1], "status": "Resolved"})
    assert status == 200, body
    assert [c["status"] for c in await ctl.calls()] == [200, 401, 200]
    assert len(await ctl.token_requests()) == 2
    calls = await ctl.calls()
    assert calls[1]["authorization"] == calls[0]["authorization"] != calls[2]["authorization"]


async def test_second_401_is_502(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    await ctl.add_faults([{"status": 401}, {"status": 401}])
    status, _, body = await post(http, hosts.url("/api/alerts/batchUpdate"), MICROSOFT_EXAMPLE)
    assert status == 502
    assert "Alert.ReadWrite.All" in body["detail"]
    assert len(await ctl.calls()) == 2


async def test_403_is_502_with_the_role_hint_and_not_retried(
    hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    await ctl.add_faults([{"status": 403}])
    status, _, body = await post(http, hosts.url("/api/alerts/batchUpdate"), MICROSOFT_EXAMPLE)
    assert status == 502
    assert "Alert.ReadWrite.All" in body["detail"] and body["upstream"]["code"] == "Forbidden"
    assert len(await ctl.calls()) == 1


@pytest.mark.parametrize("fault", [{"status": 500}, {"status": 503}, {"status": 429, "retryAfter": 2}])
async def test_retryable_upstream_failures_are_deferred_and_retried(
    hosts: HostPool, ctl: EmulatorControl, http, fault: dict[str, Any]
) -> None:
    await ctl.add_faults([fault])
    status, headers, body = await post(http, hosts.url("/api/alerts/batchUpdate"), MICROSOFT_EXAMPLE)
    assert status == 202, body
    assert headers["Location"].endswith(f"/api/operations/{body['operationId']}")
    assert int(headers["Retry-After"]) >= 1
    assert len(await ctl.calls()) == 1
    final, resource = await wait_for_operation(http, headers["Location"])
    assert final == 200 and resource["status"] == "Succeeded", resource
    calls = await ctl.calls()
    assert [c["status"] for c in calls] == [fault["status"], 200]
    if "retryAfter" in fault:  # MDE's Retry-After was honoured before the retry
        assert calls[1]["time"] - calls[0]["time"] >= fault["retryAfter"] - 0.05
    assert resource["chunks"][0]["attempts"] == 2


async def test_a_429_holds_back_the_other_chunks(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    url = hosts.url("/api/alerts/batchUpdate", DEFENDER_MAX_ALERTS_PER_CALL="1", SYNC_MAX_WAIT_SECONDS="1")
    await ctl.add_faults([{"status": 429, "retryAfter": 3}])
    status, headers, body = await post(http, url, {"alertIds": IDS[:3], "status": "Resolved"})
    assert status == 202, body
    assert [c["status"] for c in body["chunks"]] == ["Pending"] * 3
    assert len(await ctl.calls()) == 1  # nothing more was spent against a refusing upstream
    final, resource = await wait_for_operation(http, headers["Location"])
    assert final == 200, resource
    calls = await ctl.calls()
    assert [c["status"] for c in calls] == [429, 200, 200, 200]
    assert min(c["time"] for c in calls[1:]) - calls[0]["time"] >= 3 - 0.05


TIMEOUT = {"DEFENDER_HTTP_TIMEOUT_SECONDS": "0.5"}


async def test_timeout_with_a_comment_is_504_outcome_unknown(
    hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    await ctl.add_faults([{"delaySeconds": 1.5, "apply": True}])
    status, _, body = await post(http, hosts.url("/api/alerts/batchUpdate", **TIMEOUT), MICROSOFT_EXAMPLE)
    assert status == 504
    assert body["chunks"][0]["status"] == "OutcomeUnknown"
    assert len(await ctl.calls()) == 1  # never re-sent blindly: the comment would appear twice


async def test_timeout_without_a_comment_is_retried(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    await ctl.add_faults([{"delaySeconds": 1.5, "apply": False}])
    status, headers, body = await post(
        http, hosts.url("/api/alerts/batchUpdate", **TIMEOUT), {"alertIds": [ID1], "status": "Resolved"}
    )
    assert status == 202, body
    final, resource = await wait_for_operation(http, headers["Location"])
    assert final == 200, resource
    assert len(await ctl.calls()) == 2
    assert (await ctl.alert(ID1) or {}).get("status") == "Resolved"


async def test_connection_reset_after_sending_is_outcome_unknown(
    hosts: HostPool, ctl: EmulatorControl, http
) -> None:
    await ctl.add_faults([{"reset": True, "apply": True}])
    status, _, body = await post(http, hosts.url("/api/alerts/batchUpdate"), MICROSOFT_EXAMPLE)
    assert status == 504
    assert body["upstream"]["code"] == "OutcomeUnknown"


async def test_health_reports_storage_and_token(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    async with http.get(hosts.url("/api/health")) as response:
        body = await response.json()
        assert response.status == 200, body
    assert body["status"] == "Healthy"
    assert body["checks"]["storage"]["ok"] and body["checks"]["token"]["ok"]
    assert body["checks"]["budget"]["windows"][0]["calls"] == 2000
    assert any(name.startswith("chunks-") for name in body["checks"]["queues"]["depths"])


async def test_health_is_503_when_storage_is_unreachable(hosts: HostPool, ctl: EmulatorControl, http) -> None:
    dead = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
        "TableEndpoint=http://127.0.0.1:9/devstoreaccount1;QueueEndpoint=http://127.0.0.1:9/devstoreaccount1;"
    )
    async with http.get(hosts.url("/api/health", AzureWebJobsStorage=dead)) as response:
        body = await response.json()
        assert response.status == 503
    assert body["checks"]["storage"]["ok"] is False and body["checks"]["token"]["ok"] is True


def test_a_bad_setting_stops_the_host_naming_the_setting(hosts: HostPool) -> None:
    with pytest.raises(RuntimeError) as exc:
        hosts.get(DEFENDER_RATE_LIMITS="ten per minute", MAX_BODY_BYTES="-1")
    assert "DEFENDER_RATE_LIMITS" in str(exc.value) and "MAX_BODY_BYTES" in str(exc.value)
