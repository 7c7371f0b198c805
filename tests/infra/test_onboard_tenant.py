"""infra/onboard-tenant.sh prints what onboarding a customer tenant takes, and refuses what would break it.

The script is run with bash and a PATH that holds only the tools it may use: no Azure CLI (`az`) and no
`azd`, as on a machine where an operator prepares the change for someone else, so every value comes from
the options or the environment. Where the optional az/azd path is checked, small stand-ins on that PATH
answer instead of Azure, and record how they were called.

The merged value is also given to the settings module, so that what the script prints is what alertgate
accepts at start-up.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.settings import load_settings
from tests.infra import REPO

SCRIPT = REPO / "infra" / "onboard-tenant.sh"
BASH = shutil.which("bash") or "/bin/bash"
# What the script runs besides bash builtins; a new tool must be added here deliberately.
TOOLS = ("python3", "sed", "tr", "head", "cat")

APP_ID = "11111111-2222-4333-8444-555555555555"
TENANT = "9f8e7d6c-5b4a-4321-8fed-cba987654321"
FABRIKAM_TENANT = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
FABRIKAM = {
    "fabrikam": {
        "tenantId": FABRIKAM_TENANT,
        "apiBaseUrl": "https://eu.api.security.microsoft.com",
        "rateLimits": "5/60,200/3600",
        "sentinelWorkspaceIds": ["aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"],
    }
}


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """A PATH of symbolic links to the tools the script uses, and nothing else (no az, no azd)."""
    directory = tmp_path / "bin"
    directory.mkdir()
    for tool in TOOLS:
        # python3 is this test's own interpreter: a python3 found on PATH may be a shim (pyenv) that
        # needs tools this PATH leaves out.
        found = sys.executable if tool == "python3" else shutil.which(tool)
        assert found, f"{tool} is needed to run the script"
        (directory / tool).symlink_to(found)
    assert shutil.which("az", path=str(directory)) is None
    assert shutil.which("azd", path=str(directory)) is None
    return directory


def run(bin_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The script with only PATH and HOME set (plus `env`): nothing leaks in from the caller's shell."""
    return subprocess.run(
        [BASH, str(SCRIPT), *args],
        env={"PATH": str(bin_dir), "HOME": str(bin_dir.parent), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def onboard(bin_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = run(bin_dir, *args, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done


def new_value(stdout: str) -> dict[str, Any]:
    """The JSON line under the "new DEFENDER_TENANTS" heading."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "The new DEFENDER_TENANTS" in line)
    line = next(line for line in lines[start + 1 :] if line.strip())
    value: dict[str, Any] = json.loads(line)
    return value


def consent_urls(stdout: str) -> list[str]:
    return [word for word in stdout.split() if "/adminconsent?" in word]


def az_command(stdout: str) -> list[str]:
    """The printed `az functionapp config appsettings set ...` command, split as a shell would."""
    (line,) = [line for line in stdout.splitlines() if line.strip().startswith("az functionapp")]
    return shlex.split(line)


def settings_of(words: list[str]) -> dict[str, str]:
    """KEY=VALUE words after --settings (up to the next option)."""
    start = words.index("--settings") + 1
    pairs = {}
    for word in words[start:]:
        if word.startswith("--"):
            break
        key, _, value = word.partition("=")
        pairs[key] = value
    return pairs


# --- What it prints -----------------------------------------------------------------------------------


def test_prints_the_admin_consent_url_of_the_customer_tenant(bin_dir: Path) -> None:
    done = onboard(bin_dir, "--app-id", APP_ID, "--current", "{}", "contoso", TENANT.upper())
    assert consent_urls(done.stdout) == [
        f"https://login.microsoftonline.com/{TENANT}/adminconsent?client_id={APP_ID}"
    ]
    assert "Privileged Role Administrator or Global Administrator" in done.stdout


def test_the_login_host_can_be_another_clouds(bin_dir: Path) -> None:
    done = onboard(
        bin_dir,
        *("--login-host", "https://login.microsoftonline.us/"),
        *("--app-id", APP_ID, "--current", "{}", "contoso", TENANT),
    )
    assert consent_urls(done.stdout) == [
        f"https://login.microsoftonline.us/{TENANT}/adminconsent?client_id={APP_ID}"
    ]


def test_the_new_value_keeps_every_tenant_and_adds_this_one_last(bin_dir: Path) -> None:
    done = onboard(bin_dir, "--app-id", APP_ID, "--current", json.dumps(FABRIKAM), "contoso", TENANT)
    value = new_value(done.stdout)
    assert value == {**FABRIKAM, "contoso": {"tenantId": TENANT}}
    assert list(value) == ["fabrikam", "contoso"]
    assert f'"defenderTenants": {{ "value": {json.dumps(value, separators=(",", ":"))} }}' in done.stdout


def test_alertgate_accepts_the_new_value(bin_dir: Path) -> None:
    done = onboard(
        bin_dir,
        *("--app-id", APP_ID, "--current", json.dumps(FABRIKAM)),
        *("--workspace-id", "12345678-90AB-4CDE-8F01-234567890ABC"),
        *("contoso", TENANT),
    )
    settings = load_settings(
        {
            "AzureWebJobsStorage": "UseDevelopmentStorage=true",
            "DEFENDER_TENANTS": json.dumps(new_value(done.stdout)),
            "DEFENDER_APP_CLIENT_ID": APP_ID,
        }
    )
    assert sorted(settings.defender_tenants) == ["contoso", "fabrikam"]
    contoso = settings.defender_tenants["contoso"]
    assert contoso.tenant_id == TENANT
    assert contoso.sentinel_workspace_ids == ("12345678-90ab-4cde-8f01-234567890abc",)


def test_the_printed_command_sets_the_new_value_and_the_application(bin_dir: Path) -> None:
    done = onboard(
        bin_dir,
        *("--app-id", APP_ID, "--current", json.dumps(FABRIKAM)),
        *("--resource-group", "rg-alertgate", "--function-app", "func-alertgate-x"),
        *("contoso", TENANT),
    )
    words = az_command(done.stdout)
    assert words[:5] == ["az", "functionapp", "config", "appsettings", "set"]
    assert words[words.index("--resource-group") + 1] == "rg-alertgate"
    assert words[words.index("--name") + 1] == "func-alertgate-x"
    settings = settings_of(words)
    assert json.loads(settings["DEFENDER_TENANTS"]) == new_value(done.stdout)
    assert settings["DEFENDER_APP_CLIENT_ID"] == APP_ID


def test_a_quote_in_the_current_value_survives_the_printed_command(bin_dir: Path) -> None:
    current = {"fabrikam": {"tenantId": FABRIKAM["fabrikam"]["tenantId"], "tokenScope": "it's/.default"}}
    done = onboard(bin_dir, "--app-id", APP_ID, "--current", json.dumps(current), "contoso", TENANT)
    assert (
        json.loads(settings_of(az_command(done.stdout))["DEFENDER_TENANTS"])["fabrikam"]
        == current["fabrikam"]
    )


def test_sentinel_workspaces_are_added_once_in_lower_case(bin_dir: Path) -> None:
    workspace = "12345678-90ab-4cde-8f01-234567890abc"
    done = onboard(
        bin_dir,
        *("--app-id", APP_ID, "--current", "{}"),
        *("--workspace-id", workspace.upper(), "--workspace-id", workspace),
        *("contoso", TENANT),
    )
    assert new_value(done.stdout) == {"contoso": {"tenantId": TENANT, "sentinelWorkspaceIds": [workspace]}}


def test_the_environment_gives_the_current_value_and_the_application(bin_dir: Path) -> None:
    done = onboard(
        bin_dir,
        "contoso",
        TENANT,
        env={"DEFENDER_TENANTS": json.dumps(FABRIKAM), "DEFENDER_APP_CLIENT_ID": APP_ID.upper()},
    )
    assert set(new_value(done.stdout)) == {"fabrikam", "contoso"}
    assert consent_urls(done.stdout) == [
        f"https://login.microsoftonline.com/{TENANT}/adminconsent?client_id={APP_ID}"
    ]
    assert "from the environment variable DEFENDER_TENANTS" in done.stdout


def test_options_win_over_the_environment(bin_dir: Path) -> None:
    done = onboard(
        bin_dir,
        *("--app-id", APP_ID, "--current", "{}", "contoso", TENANT),
        env={
            "DEFENDER_TENANTS": json.dumps(FABRIKAM),
            "DEFENDER_APP_CLIENT_ID": "0" * 8 + "-0000-0000-0000-" + "0" * 12,
        },
    )
    assert new_value(done.stdout) == {"contoso": {"tenantId": TENANT}}
    assert f"client_id={APP_ID}" in done.stdout


# --- What it refuses --------------------------------------------------------------------------------------

CURRENT = json.dumps(FABRIKAM)
WORKSPACE_OF_FABRIKAM = FABRIKAM["fabrikam"]["sentinelWorkspaceIds"][0]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--app-id", APP_ID, "--current", CURRENT, "Contoso", TENANT], "NAME 'Contoso'"),
        (["--app-id", APP_ID, "--current", CURRENT, "contoso_eu", TENANT], "NAME 'contoso_eu'"),
        (["--app-id", APP_ID, "--current", CURRENT, "a" * 33, TENANT], "NAME 'aaaa"),
        (["--app-id", APP_ID, "--current", CURRENT, "", TENANT], "NAME ''"),
        (["--app-id", APP_ID, "--current", CURRENT, "home", TENANT], "NAME 'home' is reserved"),
        (["--app-id", APP_ID, "--current", CURRENT, "contoso", "not-a-guid"], "TENANT_ID 'not-a-guid'"),
        (["--app-id", APP_ID, "--current", CURRENT, "contoso", TENANT + "0"], "TENANT_ID"),
        (["--app-id", APP_ID, "--current", CURRENT, "fabrikam", TENANT], "NAME 'fabrikam' is already"),
        (
            ["--app-id", APP_ID, "--current", CURRENT, "contoso", FABRIKAM_TENANT.upper()],
            "TENANT_ID 0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d is already in DEFENDER_TENANTS as 'fabrikam'",
        ),
        (
            [
                "--app-id",
                APP_ID,
                "--current",
                CURRENT,
                "--workspace-id",
                WORKSPACE_OF_FABRIKAM,
                "contoso",
                TENANT,
            ],
            "--workspace-id aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee is already listed under 'fabrikam'",
        ),
        (
            ["--app-id", APP_ID, "--current", CURRENT, "--workspace-id", "x", "contoso", TENANT],
            "--workspace-id 'x'",
        ),
        (["--app-id", "not-a-guid", "--current", CURRENT, "contoso", TENANT], "--app-id 'not-a-guid'"),
        (["--current", CURRENT, "contoso", TENANT], "pass --app-id"),
        (["--app-id", APP_ID, "contoso", TENANT], "pass --current"),
        (
            ["--app-id", APP_ID, "--current", "{not json", "contoso", TENANT],
            "DEFENDER_TENANTS (--current) is not JSON",
        ),
        (
            ["--app-id", APP_ID, "--current", "[]", "contoso", TENANT],
            "DEFENDER_TENANTS (--current) is not a JSON object",
        ),
        (
            ["--app-id", APP_ID, "--current", CURRENT, "--login-host", "http://x", "contoso", TENANT],
            "--login-host",
        ),
        (["--app-id", APP_ID, "--current", CURRENT, "--apply", "contoso", TENANT], "--apply needs"),
        (
            ["--app-id", APP_ID, "--current", CURRENT, "--frobnicate", "contoso", TENANT],
            "unknown option: --frobnicate",
        ),
        (
            ["--app-id", APP_ID, "--current", CURRENT, "contoso"],
            "expected two arguments, NAME and TENANT_ID; got 1",
        ),
        (["--app-id", APP_ID, "--current", CURRENT, "contoso", TENANT, "extra"], "got 3"),
        (["--app-id"], "--app-id needs a value"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument_and_print_nothing_else(
    bin_dir: Path, args: list[str], named: str
) -> None:
    done = run(bin_dir, *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert named in done.stderr
    assert done.stdout == ""


def test_help_exits_0_and_names_the_arguments(bin_dir: Path) -> None:
    done = run(bin_dir, "--help")
    assert done.returncode == 0
    assert "Usage: infra/onboard-tenant.sh [options] NAME TENANT_ID" in done.stdout
    assert "--apply" in done.stdout


# --- The optional az / azd path, with stand-ins ---------------------------------------------------------

HOME_TENANT = "c0ffee00-1111-4222-8333-444455556666"


def stand_ins(bin_dir: Path, app_settings: dict[str, str]) -> Path:
    """`azd` answering `env get-values` and `az` answering `functionapp config appsettings list` with
    `app_settings`; `az` logs each call (its arguments as JSON, one line each) to the returned file."""
    log = bin_dir.parent / "az-calls.jsonl"
    azd_values = {
        "AZURE_TENANT_ID": HOME_TENANT,
        "AZURE_RESOURCE_GROUP": "rg-from-azd",
        "AZURE_FUNCTION_APP_NAME": "func-from-azd",
    }
    (bin_dir / "azd").write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"values = {azd_values!r}\n"
        "assert sys.argv[1:] == ['env', 'get-values'], sys.argv\n"
        "for name, value in values.items():\n"
        "    print(f'{name}=\"{value}\"')\n",
        encoding="utf-8",
    )
    (bin_dir / "az").write_text(
        f"#!{sys.executable}\n"
        "import json, re, sys\n"
        f"settings = {app_settings!r}\n"
        f"with open({str(log)!r}, 'a', encoding='utf-8') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if sys.argv[1:5] == ['functionapp', 'config', 'appsettings', 'list']:\n"
        "    query = sys.argv[sys.argv.index('--query') + 1]\n"
        "    name = re.search(r\"name=='(\\w+)'\", query).group(1)\n"
        "    print(settings.get(name, ''))\n",
        encoding="utf-8",
    )
    for tool in ("azd", "az"):
        (bin_dir / tool).chmod(0o755)
    return log


def calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


def test_missing_values_come_from_the_function_app_found_through_azd(bin_dir: Path) -> None:
    log = stand_ins(bin_dir, {"DEFENDER_TENANTS": json.dumps(FABRIKAM), "DEFENDER_APP_CLIENT_ID": APP_ID})
    done = onboard(bin_dir, "contoso", TENANT)
    assert new_value(done.stdout) == {**FABRIKAM, "contoso": {"tenantId": TENANT}}
    assert f"client_id={APP_ID}" in done.stdout
    words = az_command(done.stdout)
    assert words[words.index("--resource-group") + 1] == "rg-from-azd"
    assert words[words.index("--name") + 1] == "func-from-azd"
    listed = [c for c in calls(log) if c[:4] == ["functionapp", "config", "appsettings", "list"]]
    assert listed and all(c[c.index("--name") + 1] == "func-from-azd" for c in listed)
    assert not [c for c in calls(log) if "set" in c], "nothing is set without --apply"


def test_an_app_without_the_setting_starts_from_no_tenant(bin_dir: Path) -> None:
    stand_ins(bin_dir, {"DEFENDER_APP_CLIENT_ID": APP_ID})
    done = onboard(bin_dir, "contoso", TENANT)
    assert new_value(done.stdout) == {"contoso": {"tenantId": TENANT}}


def test_the_home_tenant_is_refused(bin_dir: Path) -> None:
    stand_ins(bin_dir, {})
    done = run(bin_dir, "--app-id", APP_ID, "--current", "{}", "contoso", HOME_TENANT.upper())
    assert done.returncode == 2
    assert f"TENANT_ID {HOME_TENANT} is the home tenant" in done.stderr


def test_apply_runs_the_printed_command(bin_dir: Path) -> None:
    log = stand_ins(bin_dir, {})
    done = onboard(
        bin_dir,
        *("--app-id", APP_ID, "--current", CURRENT, "--apply"),
        *("--resource-group", "rg-given", "--function-app", "func-given"),
        *("contoso", TENANT),
    )
    applied = [c for c in calls(log) if c[:4] == ["functionapp", "config", "appsettings", "set"]]
    assert applied == [az_command(done.stdout)[1:]]
    assert applied[0][applied[0].index("--name") + 1] == "func-given"
    assert "Applied" in done.stdout
