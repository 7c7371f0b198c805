"""alertgate's own settings (docs/contracts.md §4) are one set in the code, in the deployment and in the local sample.

A setting the code reads but the deployment never sets silently runs on its default in Azure; one the
deployment sets but the code never reads is dead configuration an operator will trust; one missing from
local.settings.sample.json is unknown to every developer. So the three sets must be equal:

- the code: `shared.settings.names_read() - PLATFORM_NAMES`;
- main.bicep (with the function app module it passes them to): every UPPER_SNAKE_CASE object key, and
  the identity-based `AzureWebJobs*` keys, is an app setting (Bicep's own properties are camelCase);
- local.settings.sample.json: the keys of `Values`;

less the platform's settings in PLATFORM_ALLOW_LIST, each with the reason it may differ. Bicep cannot be
compiled here, so the templates are read as text; the reading rules are deliberately simple and are
stated in a comment at the top of main.bicep.

Beyond the names, the deployment's defaults must be the documented ones: each alertgate setting comes
from a Bicep parameter whose default, given to the settings module, yields the same settings as no value
at all; and the azd parameters file may only repeat those defaults.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any

import pytest

from shared.settings import PLATFORM_NAMES, load_settings, names_read
from tests.infra import REPO, registered_functions

MAIN_BICEP = REPO / "infra" / "main.bicep"
FUNCTION_APP_BICEP = REPO / "infra" / "modules" / "functionapp.bicep"
PARAMETERS_JSON = REPO / "infra" / "main.parameters.json"
SAMPLE = REPO / "local.settings.sample.json"

# Settings that are not alertgate's own and so may be set in one place and not another. A name or a
# glob pattern, with the reason.
PLATFORM_ALLOW_LIST: dict[str, str] = {
    "AzureWebJobsStorage": (
        "the Functions host's storage connection: a connection string to Azurite locally; in Azure the "
        "identity-based __ forms replace it"
    ),
    "AzureWebJobsStorage__*": (
        "identity-based forms of AzureWebJobsStorage (__accountName, __credential, __clientId, the "
        "service URIs of other clouds): set by the deployment, read by the host and by alertgate's "
        "storage clients, never needed with a local connection string"
    ),
    "FUNCTIONS_*": (
        "the Functions runtime's own: FUNCTIONS_WORKER_RUNTIME tells Core Tools the language; on Flex "
        "Consumption functionAppConfig.runtime replaces it and the setting is deprecated"
    ),
    "APPLICATIONINSIGHTS_*": (
        "telemetry to the Application Insights the deployment creates (connection string, Entra "
        "authentication as the identity); there is none locally"
    ),
    "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY": (
        "the Python worker's own switch of OpenTelemetry mode (with host.json's telemetryMode): in Azure it "
        "configures the Azure Monitor exporter that takes alertgate's metrics and events (docs/telemetry.md) "
        "to Application Insights; there is none locally, where the OpenTelemetry API stays a no-op"
    ),
    "AzureWebJobsFeatureFlags": (
        "host feature flags: EnableWorkerIndexing for older Core Tools hosts; the default in Azure"
    ),
    "AZURE_AUTHORITY_HOST": (
        "azure-identity's own variable, read by azure-identity and not by alertgate's settings: set in "
        "Azure only for sovereign clouds (GCC High / DoD)"
    ),
    "IDENTITY_ENDPOINT": (
        "App Service's managed-identity endpoint: the platform sets it in Azure; the sample points it at "
        "the local identity emulator"
    ),
    "IDENTITY_HEADER": "the header that authenticates calls to IDENTITY_ENDPOINT; likewise",
    "MSI_ENDPOINT": "the older name of the identity endpoint, set by the platform where it applies",
    "WEBSITE_INSTANCE_ID": "set by App Service on every instance; tells alertgate it runs in Azure",
    "WEBSITE_AUTH_ENABLED": (
        "set by App Service (True) when its authentication is on, which the deployment's enableEntraAuth "
        "parameter turns on; an app setting of that name would let alertgate trust forged principal "
        "headers without the platform's authentication, so the deployment never sets it"
    ),
}


def is_platform(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in PLATFORM_ALLOW_LIST)


# --- Reading Bicep as text --------------------------------------------------------------------------------

_APP_SETTING = re.compile(r"^(?:[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|AzureWebJobs\w*)$")
_OBJECT_KEY = re.compile(r"^[ \t]*(?:'([^']*)'|([A-Za-z_][A-Za-z0-9_]*))[ \t]*:", re.MULTILINE)
_PARAM = re.compile(r"^param[ \t]+(\w+)[ \t]+(\w+)[ \t]*(?:=[ \t]*(.*?))?[ \t]*$", re.MULTILINE)


def bicep_code(text: str, *, keep_strings: bool) -> str:
    """The Bicep text without comments and, unless keep_strings, with every string literal emptied.

    Emptied strings keep descriptions such as 'DEFENDER_API_BASE_URL: ...' from reading as object keys.
    Handles '...' with backslash escapes and '''...''' multi-line strings.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif text.startswith("'''", i):
            end = text.find("'''", i + 3)
            stop = n if end < 0 else end + 3
            out.append(text[i:stop] if keep_strings else "''")
            i = stop
        elif text[i] == "'":
            j = i + 1
            while j < n and text[j] != "'":
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1] if keep_strings else "''")
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def bicep_app_setting_names(*paths: Path) -> set[str]:
    """Every object key in the files that names an app setting (UPPER_SNAKE_CASE or AzureWebJobs*)."""
    names: set[str] = set()
    for path in paths:
        for quoted, bare in _OBJECT_KEY.findall(
            bicep_code(path.read_text(encoding="utf-8"), keep_strings=True)
        ):
            key = quoted or bare
            if _APP_SETTING.match(key):
                names.add(key)
    return names


def bicep_string(literal: str) -> str:
    """The value of a single-quoted Bicep string literal (\\\\, \\', \\n, \\r, \\t and \\$ escapes)."""
    assert literal.startswith("'") and literal.endswith("'"), literal
    escapes = {"\\": "\\", "'": "'", "n": "\n", "r": "\r", "t": "\t", "$": "$"}
    body, out, i = literal[1:-1], [], 0
    while i < len(body):
        if body[i] == "\\":
            out.append(escapes[body[i + 1]])
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def bicep_param_defaults(path: Path) -> dict[str, Any]:
    """Parameters with a literal default: string, int, bool, or an empty object. Others map to None."""
    defaults: dict[str, Any] = {}
    for name, kind, default in _PARAM.findall(
        bicep_code(path.read_text(encoding="utf-8"), keep_strings=True)
    ):
        value: Any = None
        if default.startswith("'") and default.endswith("'"):
            value = bicep_string(default)
        elif kind == "int" and re.fullmatch(r"-?\d+", default):
            value = int(default)
        elif kind == "bool" and default in ("true", "false"):
            value = default == "true"
        elif kind == "object" and default == "{}":
            value = {}
        defaults[name] = value
    return defaults


def bicep_block(path: Path, var_name: str, opener: str) -> str:
    """The text of `var <var_name> = {...}` (or [...]), found by balancing brackets outside strings."""
    code = bicep_code(path.read_text(encoding="utf-8"), keep_strings=True)
    match = re.search(rf"^var[ \t]+{var_name}[ \t]*=[ \t]*\{opener}", code, re.MULTILINE)
    assert match, f"{path.name} has no `var {var_name} = {opener}...`"
    closer = {"{": "}", "[": "]"}[opener]
    depth, i, in_string = 0, match.end() - 1, False
    while i < len(code):
        char = code[i]
        if in_string:
            if char == "\\":
                i += 1
            elif char == "'":
                in_string = False
        elif char == "'":
            in_string = True
        elif char == opener:
            depth += 1
        elif char == closer:
            depth -= 1
            if depth == 0:
                return code[match.end() : i]
        i += 1
    raise AssertionError(f"unbalanced `var {var_name}` in {path.name}")


def app_setting_sources(path: Path, var_name: str) -> dict[str, str]:
    """setting name -> its Bicep expression, from the object assigned to `var <var_name>`."""
    lines = bicep_block(path, var_name, "{").splitlines()
    pairs = (re.match(r"^\s*([A-Za-z_]\w*)\s*:\s*(.+?)\s*$", line) for line in lines)
    return {m.group(1): m.group(2) for m in pairs if m}


def evaluate(expression: str, params: dict[str, Any]) -> Any:
    """The value of a parameter reference, a Bicep string with ${param} interpolations, or string(param)."""
    expression = expression.strip()
    if re.fullmatch(r"[A-Za-z_]\w*", expression):
        return params[expression]
    wrapped = re.fullmatch(r"string\(([A-Za-z_]\w*)\)", expression)
    if wrapped:
        return as_app_setting(params[wrapped.group(1)])
    if expression.startswith("'"):
        return re.sub(r"\$\{(\w+)\}", lambda m: str(params[m.group(1)]), bicep_string(expression))
    raise AssertionError(f"cannot evaluate {expression!r}: use a parameter, string(parameter) or a string")


def as_app_setting(value: Any) -> str:
    """What Bicep's string() makes of a parameter value: app settings are strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


# --- The three sets ---------------------------------------------------------------------------------------


def code_settings() -> set[str]:
    return set(names_read() - PLATFORM_NAMES)


def deployed_settings() -> set[str]:
    return bicep_app_setting_names(MAIN_BICEP, FUNCTION_APP_BICEP)


def sample_settings() -> set[str]:
    return set(json.loads(SAMPLE.read_text(encoding="utf-8"))["Values"])


def differences(code: set[str], deployed: set[str], sample: set[str]) -> list[str]:
    """One line per setting that is alertgate's own somewhere but missing elsewhere."""
    places = {
        "the code (shared/settings.py)": code,
        "infra/main.bicep": {n for n in deployed if not is_platform(n)},
        "local.settings.sample.json": {n for n in sample if not is_platform(n)},
    }
    problems = []
    for name in sorted(set().union(*places.values())):
        missing = [place for place, names in places.items() if name not in names]
        if missing:
            present = [place for place, names in places.items() if name in names]
            problems.append(f"{name}: in {', '.join(present)} but not in {', '.join(missing)}")
    return problems


def test_alertgate_settings_are_the_same_set_in_code_deployment_and_sample() -> None:
    problems = differences(code_settings(), deployed_settings(), sample_settings())
    assert not problems, (
        "alertgate's settings differ (add the setting everywhere, or to PLATFORM_ALLOW_LIST with a reason "
        "if it is the platform's):\n" + "\n".join(problems)
    )


@pytest.mark.parametrize(
    ("place", "extra"),
    [("code", "NEW_SETTING"), ("deployed", "NEW_SETTING"), ("sample", "NEW_SETTING")],
)
def test_a_setting_added_in_one_place_only_is_reported(place: str, extra: str) -> None:
    sets = {"code": code_settings(), "deployed": deployed_settings(), "sample": sample_settings()}
    sets[place] = sets[place] | {extra}
    problems = differences(sets["code"], sets["deployed"], sets["sample"])
    assert len(problems) == 1 and problems[0].startswith(f"{extra}: in "), problems


def test_the_allow_list_hides_no_setting_of_alertgate_and_covers_the_platform_names() -> None:
    own = code_settings()
    assert not {n for n in own if is_platform(n)}, (
        "an allow-list entry matches one of alertgate's own settings"
    )
    assert all(is_platform(n) for n in PLATFORM_NAMES), (
        f"shared.settings.PLATFORM_NAMES not in the allow-list: {sorted(n for n in PLATFORM_NAMES if not is_platform(n))}"
    )
    assert all(reason.strip() for reason in PLATFORM_ALLOW_LIST.values())


def test_the_deployment_leaves_app_service_authentication_to_say_whether_it_is_on() -> None:
    """WEBSITE_AUTH_ENABLED makes alertgate believe X-MS-CLIENT-PRINCIPAL-* headers; only App Service,
    with its authentication on, may set it (as an app setting it would trust forged headers)."""
    assert "WEBSITE_AUTH_ENABLED" not in deployed_settings()
    assert "WEBSITE_AUTH_ENABLED" in names_read()


def test_the_deployment_sets_the_identity_based_storage_connection() -> None:
    deployed = deployed_settings()
    for name in (
        "AzureWebJobsStorage__accountName",
        "AzureWebJobsStorage__credential",
        "AzureWebJobsStorage__clientId",
        "APPLICATIONINSIGHTS_CONNECTION_STRING",
    ):
        assert name in deployed, f"{name} is not set by the deployment"
    assert "AzureWebJobsStorage" not in deployed, "no storage connection string (shared keys are disabled)"
    settings = app_setting_sources(FUNCTION_APP_BICEP, "identityStorageSettings")
    assert settings["AzureWebJobsStorage__credential"] == "'managedidentity'"


# What OpenTelemetry mode needs in Azure (docs/telemetry.md): without the connection string nothing is
# exported, and without the worker's switch alertgate's metrics and events never leave the process.
TELEMETRY_SETTINGS = {
    "APPLICATIONINSIGHTS_CONNECTION_STRING": "applicationInsights.properties.ConnectionString",
    "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY": "'true'",
}


def telemetry_problems(main_bicep: str, function_app_bicep: str) -> list[str]:
    """What is wrong with the telemetry settings in these two texts of the templates."""
    deployed: set[str] = set()
    for text in (main_bicep, function_app_bicep):
        for quoted, bare in _OBJECT_KEY.findall(bicep_code(text, keep_strings=True)):
            deployed.add(quoted or bare)
    problems = [f"{name} is not set by the deployment" for name in TELEMETRY_SETTINGS if name not in deployed]
    code = bicep_code(function_app_bicep, keep_strings=True)
    for name, expected in TELEMETRY_SETTINGS.items():
        found = re.findall(rf"^[ \t]*{name}[ \t]*:[ \t]*(.+?)[ \t]*$", code, re.MULTILINE)
        if name in deployed and found != [expected]:
            problems.append(f"{name} is {found or 'not set in functionapp.bicep'}, expected {expected}")
    return problems


def test_the_deployment_turns_on_opentelemetry_mode() -> None:
    problems = telemetry_problems(
        MAIN_BICEP.read_text(encoding="utf-8"), FUNCTION_APP_BICEP.read_text(encoding="utf-8")
    )
    assert not problems, problems


@pytest.mark.parametrize("name", sorted(TELEMETRY_SETTINGS))
def test_a_telemetry_setting_removed_from_the_deployment_is_reported(name: str) -> None:
    main = MAIN_BICEP.read_text(encoding="utf-8")
    function_app = FUNCTION_APP_BICEP.read_text(encoding="utf-8")
    without = re.sub(rf"^[ \t]*{name}[ \t]*:.*\n", "", function_app, flags=re.MULTILINE)
    assert without != function_app, f"{name} is not a line of functionapp.bicep"
    assert telemetry_problems(main, without) == [f"{name} is not set by the deployment"]


def test_every_alertgate_setting_comes_from_a_parameter_with_the_documented_default() -> None:
    """Each Bicep default, given to the settings module, parses to what no value at all gives."""
    params = bicep_param_defaults(MAIN_BICEP)
    sources = app_setting_sources(MAIN_BICEP, "alertgateAppSettings")
    assert set(sources) == code_settings(), "alertgateAppSettings must hold exactly alertgate's settings"
    base = {"AzureWebJobsStorage": "UseDevelopmentStorage=true"}
    documented = load_settings(base)
    for name, expression in sources.items():
        if name == "AZURE_CLIENT_ID":
            assert expression == "identity.outputs.clientId", "AZURE_CLIENT_ID is the managed identity's"
            continue
        value = evaluate(expression, params)
        assert value is not None, f"{name} = {expression}: its parameter needs a literal default"
        deployed = load_settings({**base, name: as_app_setting(value)})
        assert deployed == documented, f"{name}: the Bicep default {value!r} is not the documented default"


def test_azd_parameter_defaults_repeat_the_bicep_defaults() -> None:
    """`${ENV_VAR=default}` in main.parameters.json must not drift from the Bicep parameter's default."""
    bicep = bicep_param_defaults(MAIN_BICEP)
    parameters = json.loads(PARAMETERS_JSON.read_text(encoding="utf-8"))["parameters"]
    checked = 0
    for name, entry in parameters.items():
        assert name in bicep, f"main.parameters.json sets {name}, which main.bicep does not declare"
        value = entry["value"]
        match = re.fullmatch(r"\$\{(\w+)=(.*)\}", value) if isinstance(value, str) else None
        if not match or bicep[name] is None:
            continue
        expected = bicep[name]
        assert match.group(2) == (as_app_setting(expected) if not isinstance(expected, str) else expected), (
            f"{name}: azd default {match.group(2)!r} differs from main.bicep's {expected!r}"
        )
        checked += 1
    assert checked >= 20


async def test_storage_holds_exactly_the_tables_and_queues_the_app_uses() -> None:
    """With the default settings: the queue triggers' queues and shared/storage.py's tables."""
    from azure.core.credentials import AzureNamedKeyCredential
    from azure.data.tables.aio import TableServiceClient

    from shared.storage import Tables

    params = bicep_param_defaults(MAIN_BICEP)
    listed = {
        var: [
            evaluate(item, params) for item in bicep_block(MAIN_BICEP, var, "[").split("\n") if item.strip()
        ]
        for var in ("tableNames", "queueNames")
    }
    queues = {f["queue"] for f in registered_functions() if f["type"] == "queueTrigger"}
    assert sorted(listed["queueNames"]) == sorted(queues)

    service = TableServiceClient(
        endpoint="https://example.table.core.windows.net",
        credential=AzureNamedKeyCredential("example", "ZXhhbXBsZQ=="),
    )
    async with service:  # never connects: only the names are wanted
        tables = Tables.from_service(service, load_settings({"AzureWebJobsStorage": "x"}).table_prefix)
        assert sorted(listed["tableNames"]) == sorted(t.name for t in tables.all())
