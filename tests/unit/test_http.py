"""shared/http.py's answers: no nulls (OpenAPI 2.0 cannot type them), and a problem's status is HTTP's."""

from __future__ import annotations

import pytest

from shared.api import caller_of
from shared.http import ApiRequest, json_response, problem, without_nulls


def test_none_members_are_left_out_at_any_depth() -> None:
    document = {"a": None, "b": {"c": None, "d": 1}, "e": [{"f": None}, None, 2]}
    assert without_nulls(document) == {"b": {"d": 1}, "e": [{}, None, 2]}
    assert json_response(200, {"caller": {"principalName": "p", "identityProvider": None}}).json == {
        "caller": {"principalName": "p"}
    }


def test_a_problem_keeps_the_http_status_and_moves_an_operation_status_aside() -> None:
    answer = problem(
        504, "outcome-unknown", "Outcome unknown", "no answer", extra={"status": "Failed", "upstream": None}
    )
    assert answer.status == 504
    assert answer.json["status"] == 504 and answer.json["operationStatus"] == "Failed"
    assert "upstream" not in answer.json
    assert answer.headers["Content-Type"].startswith("application/problem+json")


FORGED = {
    "x-ms-client-principal-name": "someone@contoso.com",
    "X-MS-CLIENT-PRINCIPAL-ID": "oid-2",
    "X-MS-CLIENT-PRINCIPAL-IDP": "aad",
}


@pytest.mark.parametrize(
    ("auth_enabled", "headers", "caller"),
    [
        (False, FORGED, {"authentication": "functionKey"}),
        (False, {}, {"authentication": "functionKey"}),
        (True, {}, {"authentication": "functionKey"}),
        (
            True,
            FORGED,
            {
                "authentication": "entra",
                "principalName": "someone@contoso.com",
                "principalId": "oid-2",
                "identityProvider": "aad",
            },
        ),
    ],
)
def test_principal_headers_are_believed_only_with_app_service_authentication(
    auth_enabled: bool, headers: dict[str, str], caller: dict[str, str]
) -> None:
    request = ApiRequest("POST", "https://h/api/alerts/batchUpdate", headers)
    assert caller_of(request, auth_enabled) == caller
