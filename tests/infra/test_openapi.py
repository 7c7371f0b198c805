"""openapi.yaml is a valid OpenAPI 2.0 document that describes exactly the API function_app.py serves.

Logic Apps and Power Automate custom connectors import OpenAPI 2.0 (Swagger), so the document is the
contract a low-code caller sees: a route it lacks cannot be called from a connector, and a route it has
that the app dropped fails only at run time. The paths are compared with the HTTP routes the app
registers (discovered by importing it, tests/infra/__init__.py), the enums with the validation model,
and the documented examples with the request schemas.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from jsonschema import Draft4Validator  # type: ignore[import-untyped]
from openapi_spec_validator import OpenAPIV2SpecValidator, validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from shared import validation as model
from tests.infra import REPO, registered_functions

OPENAPI = REPO / "openapi.yaml"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    return document


def operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (path, method): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }


def schema_validator(spec: dict[str, Any], definition: str) -> Draft4Validator:
    """A validator of one definition; Swagger 2.0 schemas are (a subset of) JSON Schema draft 4."""
    return Draft4Validator({"$ref": f"#/definitions/{definition}", "definitions": spec["definitions"]})


def test_it_is_a_valid_openapi_2_document(spec: dict[str, Any]) -> None:
    assert spec["swagger"] == "2.0"
    validate(spec, cls=OpenAPIV2SpecValidator)


def test_the_validator_rejects_a_broken_document(spec: dict[str, Any]) -> None:
    """The check above would pass vacuously if the validator accepted anything."""
    broken = copy.deepcopy(spec)
    broken["paths"]["/health"]["get"]["responses"]["200"] = {"schema": {"type": "object"}}  # no description
    with pytest.raises(OpenAPIValidationError):
        validate(broken, cls=OpenAPIV2SpecValidator)


def test_paths_are_exactly_the_http_routes_of_the_app(spec: dict[str, Any]) -> None:
    host = json.loads((REPO / "host.json").read_text(encoding="utf-8"))
    assert spec["basePath"] == "/" + host["extensions"]["http"]["routePrefix"]
    served = {
        ("/" + f["route"], method.lower())
        for f in registered_functions()
        if f["type"] == "httpTrigger"
        for method in f["methods"]
    }
    assert served, "no HTTP route discovered: did the app's registration change?"
    assert set(operations(spec)) == served


def test_every_operation_takes_the_function_key_in_the_query_or_a_header(spec: dict[str, Any]) -> None:
    schemes = spec["securityDefinitions"]
    by_place = {(s["in"], s["name"]) for s in schemes.values() if s["type"] == "apiKey"}
    assert by_place == {("query", "code"), ("header", "x-functions-key")}
    assert spec["security"] == [{name: []} for name in schemes]
    for key, operation in operations(spec).items():
        assert "security" not in operation, f"{key} overrides the function-key requirement"


def test_posts_follow_the_asynchronous_pattern(spec: dict[str, Any]) -> None:
    """202 with Location and Retry-After, and the long-running hints connectors and AutoRest read."""
    for (path, method), operation in operations(spec).items():
        if method != "post":
            continue
        accepted = operation["responses"]["202"]
        assert {"Location", "Retry-After"} <= set(accepted["headers"]), path
        assert operation.get("x-ms-long-running-operation") is True, path
        assert operation["x-ms-long-running-operation-options"] == {"final-state-via": "location"}, path
    polled = spec["paths"]["/operations/{operationId}"]["get"]["responses"]
    assert {"Location", "Retry-After"} <= set(polled["202"]["headers"])


def test_errors_are_problem_details(spec: dict[str, Any]) -> None:
    assert "application/problem+json" in spec["produces"]
    problem = spec["definitions"]["Problem"]["properties"]
    assert {"type", "title", "status", "detail", "errors"} <= set(problem)
    for (path, method), operation in operations(spec).items():
        if path.startswith("/operations/") or path == "/health":
            continue  # these answer failures with the resource itself (docs/contracts.md §1)
        for status, response in operation["responses"].items():
            if int(status) < 400:
                continue
            if "$ref" in response:
                response = spec["responses"][response["$ref"].rsplit("/", 1)[1]]
            assert response["schema"] == {"$ref": "#/definitions/Problem"}, f"{method} {path} {status}"


def test_enums_are_the_validation_models(spec: dict[str, Any]) -> None:
    """Canonical values and the aliases alertgate accepts; the retired values are refused, so absent."""
    fields = spec["definitions"]["BatchUpdateRequest"]["properties"]
    assert fields["status"]["enum"] == list(model.STATUS_VALUES)
    assert fields["classification"]["enum"] == [*model.CLASSIFICATION_VALUES, *model.CLASSIFICATION_ALIASES]
    assert fields["determination"]["enum"] == [*model.DETERMINATION_VALUES, *model.DETERMINATION_ALIASES]
    assert not set(fields["determination"]["enum"]) & set(model.RETIRED_DETERMINATIONS)
    assert set(fields) == set(model.FIELD_ORDER)
    assert fields["assignedTo"]["maxLength"] == model.ASSIGNED_TO_MAX
    assert fields["comment"]["maxLength"] == model.COMMENT_MAX


@pytest.mark.parametrize(
    ("example", "definition"),
    [
        ("docs/example-batch-update.json", "BatchUpdateRequest"),
        ("tests/fixtures/sentinel/closed_false_positive.json", "SentinelIncident"),
    ],
)
def test_documented_examples_match_the_request_schemas(
    spec: dict[str, Any], example: str, definition: str
) -> None:
    document = json.loads(Path(REPO, example).read_text(encoding="utf-8"))
    errors = [e.message for e in schema_validator(spec, definition).iter_errors(document)]
    assert not errors, errors


def test_the_request_schema_refuses_what_alertgate_refuses(spec: dict[str, Any]) -> None:
    validator = schema_validator(spec, "BatchUpdateRequest")
    ids = ["da637399794050273582_760707377"]
    assert not validator.is_valid({"alertIds": ids}), "at least one field besides alertIds"
    assert not validator.is_valid({"alertIds": ids, "status": "Resolved", "unknown": 1}), "unknown field"
    assert not validator.is_valid({"alertIds": ids, "determination": "Apt"}), "retired value"
    assert validator.is_valid({"alertIds": ids, "determination": "Clean"}), "alias"
