#!/usr/bin/env bash
# Onboards a customer tenant (MSSP) into alertgate: prints the admin-consent URL for the customer's
# administrator, the new DEFENDER_TENANTS value with the tenant added, and the command that applies it
# (docs/tenants.md). It changes nothing unless --apply is given.
#
# Nothing here needs the Azure CLI: with --app-id and --current (or the environment variables
# DEFENDER_APP_CLIENT_ID and DEFENDER_TENANTS) it works offline. Where azd and az are installed and signed
# in, it reads what it was not given from the azd environment and the function app's settings.
#
# Exit codes: 0 done; 2 bad arguments (the message names the argument); 1 anything else.
set -euo pipefail

GUID_RE='^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
NAME_RE='^[a-z0-9-]{1,32}$'

usage() {
  cat <<'EOF'
Usage: infra/onboard-tenant.sh [options] NAME TENANT_ID

Adds the customer tenant TENANT_ID to alertgate under NAME: prints the admin-consent URL for the
customer's administrator, the new DEFENDER_TENANTS value, and the command that sets it.

  NAME       how alertgate names the tenant (routes /api/tenants/NAME/...): ^[a-z0-9-]{1,32}$, not
             "home" (the managed identity's own tenant)
  TENANT_ID  the customer's Directory (tenant) ID, a GUID

Options:
  --app-id ID            client id of the multi-tenant application (DEFENDER_APP_CLIENT_ID). Default: the
                         environment variable DEFENDER_APP_CLIENT_ID, else ALERTGATE_MULTITENANT_APP_CLIENT_ID
                         of the azd environment, else the function app's DEFENDER_APP_CLIENT_ID (az).
  --current JSON         the current DEFENDER_TENANTS ('{}' for the first tenant). Default: the environment
                         variable DEFENDER_TENANTS, else the function app's setting (az).
  --workspace-id GUID    a Microsoft Sentinel workspace of this customer whose incidents posted to the plain
                         route go to this tenant (sentinelWorkspaceIds); repeatable.
  --resource-group RG    the function app's resource group. Default: AZURE_RESOURCE_GROUP (azd environment).
  --function-app NAME    the function app. Default: AZURE_FUNCTION_APP_NAME (azd environment).
  --login-host URL       Microsoft Entra login host (default https://login.microsoftonline.com;
                         https://login.microsoftonline.us for Azure Government).
  --apply                also run the printed az command (needs az, signed in with Website Contributor
                         or Contributor on the function app).
  -h, --help             this help.

Exit codes: 0 done, 2 bad arguments, 1 anything else (az failed, a setting could not be read).
EOF
}

usage_error() {
  echo "onboard-tenant.sh: $*" >&2
  echo "(infra/onboard-tenant.sh --help for the usage)" >&2
  exit 2
}

fail() {
  echo "onboard-tenant.sh: $*" >&2
  exit 1
}

need_value() { # OPTION ARGC: an option's value must follow it
  [ "$2" -ge 2 ] || usage_error "$1 needs a value"
}

lower() {
  printf '%s' "$1" | tr '[:upper:]' '[:lower:]'
}

app_id=""
app_id_from=""
current=""
current_given=false
current_from=""
workspaces="" # newline-separated
resource_group=""
function_app=""
login_host=https://login.microsoftonline.com
apply=false
positional=()

while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --app-id)
      need_value "$1" $#
      app_id=$2
      app_id_from="--app-id"
      shift 2
      ;;
    --current)
      need_value "$1" $#
      current=$2
      current_given=true
      current_from="--current"
      shift 2
      ;;
    --workspace-id)
      need_value "$1" $#
      [[ "$2" =~ $GUID_RE ]] || usage_error "--workspace-id '$2' is not a GUID (a Log Analytics workspace id)"
      workspaces+="$(lower "$2")"$'\n'
      shift 2
      ;;
    --resource-group)
      need_value "$1" $#
      resource_group=$2
      shift 2
      ;;
    --function-app)
      need_value "$1" $#
      function_app=$2
      shift 2
      ;;
    --login-host)
      need_value "$1" $#
      [[ "$2" =~ ^https://[^/[:space:]]+/?$ ]] || usage_error "--login-host '$2' must be an https:// host, like https://login.microsoftonline.us"
      login_host=${2%/}
      shift 2
      ;;
    --apply)
      apply=true
      shift
      ;;
    --)
      shift
      positional+=("$@")
      break
      ;;
    -*)
      usage_error "unknown option: $1"
      ;;
    *)
      positional+=("$1")
      shift
      ;;
  esac
done

[ ${#positional[@]} -eq 2 ] || usage_error "expected two arguments, NAME and TENANT_ID; got ${#positional[@]}"
name=${positional[0]}
tenant_id=${positional[1]}

[[ "$name" =~ $NAME_RE ]] || usage_error "NAME '$name' must match ^[a-z0-9-]{1,32}\$: lower-case letters, digits and hyphens, at most 32"
[ "$name" != home ] || usage_error "NAME 'home' is reserved: it is the home tenant (the managed identity's own), served without onboarding"
[[ "$tenant_id" =~ $GUID_RE ]] || usage_error "TENANT_ID '$tenant_id' is not a GUID: it is the customer's Directory (tenant) ID, like 00000000-0000-0000-0000-000000000000"
tenant_id=$(lower "$tenant_id")
if [ -n "$app_id" ] && ! [[ "$app_id" =~ $GUID_RE ]]; then
  usage_error "--app-id '$app_id' is not a GUID: it is the multi-tenant application's client id"
fi

# --- What was not given: from the environment, the azd environment, the function app (all optional) ------

azd_values=""
if command -v azd >/dev/null 2>&1; then
  azd_values=$(azd env get-values 2>/dev/null || true) # empty outside an azd project or environment
fi
azd_value() { # NAME: its value in the current azd environment, or nothing
  # The output of `azd env get-values` is data, not a script: read the one line, never source it.
  printf '%s\n' "$azd_values" | sed -n "s/^$1=\"\{0,1\}\([^\"]*\)\"\{0,1\}\$/\1/p" | head -n 1
}

app_setting() { # NAME: the function app's setting (empty when unset); fails when it cannot be read
  command -v az >/dev/null 2>&1 || return 1
  [ -n "$resource_group" ] && [ -n "$function_app" ] || return 1
  local value
  value=$(az functionapp config appsettings list --resource-group "$resource_group" --name "$function_app" \
    --query "[?name=='$1'].value | [0]" --output tsv 2>/dev/null) || return 1
  [ "$value" = None ] && value=""
  printf '%s' "$value"
}

if [ -z "$resource_group" ]; then
  resource_group=$(azd_value AZURE_RESOURCE_GROUP)
fi
if [ -z "$function_app" ]; then
  function_app=$(azd_value AZURE_FUNCTION_APP_NAME)
fi
app_where="function app ${function_app:-?} in ${resource_group:-?}"
if $apply; then
  [ -n "$resource_group" ] && [ -n "$function_app" ] ||
    usage_error "--apply needs the function app: pass --resource-group and --function-app (or run in an azd environment)"
  command -v az >/dev/null 2>&1 || fail "--apply needs the Azure CLI (az): https://aka.ms/azure-cli"
fi
home_tenant=$(lower "$(azd_value AZURE_TENANT_ID)")
[ "$tenant_id" != "$home_tenant" ] ||
  usage_error "TENANT_ID $tenant_id is the home tenant (AZURE_TENANT_ID of the azd environment): alertgate serves it as 'home' already"

if [ -z "$app_id" ] && [ -n "${DEFENDER_APP_CLIENT_ID:-}" ]; then
  app_id=$DEFENDER_APP_CLIENT_ID
  app_id_from="the environment variable DEFENDER_APP_CLIENT_ID"
  [[ "$app_id" =~ $GUID_RE ]] || usage_error "DEFENDER_APP_CLIENT_ID (environment) '$app_id' is not a GUID"
fi
if [ -z "$app_id" ]; then
  app_id=$(azd_value ALERTGATE_MULTITENANT_APP_CLIENT_ID)
  app_id_from="ALERTGATE_MULTITENANT_APP_CLIENT_ID of the azd environment"
fi
if [ -z "$app_id" ] && app_id=$(app_setting DEFENDER_APP_CLIENT_ID) && [ -n "$app_id" ]; then
  app_id_from="DEFENDER_APP_CLIENT_ID of the $app_where"
fi
[ -n "$app_id" ] || usage_error "no application id: pass --app-id with the multi-tenant application's client id (DEFENDER_APP_CLIENT_ID; docs/tenants.md says how to create the application)"
[[ "$app_id" =~ $GUID_RE ]] || fail "the application id '$app_id' ($app_id_from) is not a GUID"
app_id=$(lower "$app_id")

if ! $current_given && [ -n "${DEFENDER_TENANTS:-}" ]; then
  current=$DEFENDER_TENANTS
  current_from="the environment variable DEFENDER_TENANTS"
  current_given=true
fi
if ! $current_given; then
  if current=$(app_setting DEFENDER_TENANTS); then
    current=${current:-'{}'}
    current_from="DEFENDER_TENANTS of the $app_where"
  else
    usage_error "the current DEFENDER_TENANTS is unknown: pass --current (--current '{}' for the first tenant) or set DEFENDER_TENANTS, or run where az can read the function app's settings (--resource-group, --function-app, or an azd environment)"
  fi
fi

# --- The new value: the current one with this tenant added (python3: always there where alertgate is) ----

command -v python3 >/dev/null 2>&1 || fail "python3 is needed to edit the JSON value"
new_value=$(
  ONBOARD_CURRENT=$current ONBOARD_FROM=$current_from ONBOARD_NAME=$name ONBOARD_TENANT=$tenant_id \
    ONBOARD_WORKSPACES=$workspaces python3 -c '
import json
import os
import sys

source = os.environ["ONBOARD_FROM"]
name, tenant = os.environ["ONBOARD_NAME"], os.environ["ONBOARD_TENANT"]
workspaces = list(dict.fromkeys(w for w in os.environ["ONBOARD_WORKSPACES"].split("\n") if w))

def refuse(message):
    print(f"onboard-tenant.sh: {message}", file=sys.stderr)
    sys.exit(2)

try:
    tenants = json.loads(os.environ["ONBOARD_CURRENT"])
except ValueError as exc:
    refuse(f"the current DEFENDER_TENANTS ({source}) is not JSON: {exc}")
if not isinstance(tenants, dict):
    refuse(f"the current DEFENDER_TENANTS ({source}) is not a JSON object of tenants by name")
if name in tenants:
    refuse(f"NAME {name!r} is already in DEFENDER_TENANTS ({source}): choose another name")
for other, spec in tenants.items():
    spec = spec if isinstance(spec, dict) else {}
    if str(spec.get("tenantId", "")).lower() == tenant:
        refuse(f"TENANT_ID {tenant} is already in DEFENDER_TENANTS as {other!r} ({source})")
    listed = spec.get("sentinelWorkspaceIds")
    taken = {str(w).lower() for w in listed} if isinstance(listed, list) else set()
    for workspace in workspaces:
        if workspace in taken:
            refuse(f"--workspace-id {workspace} is already listed under {other!r} in DEFENDER_TENANTS ({source})")
entry = {"tenantId": tenant}
if workspaces:
    entry["sentinelWorkspaceIds"] = workspaces
tenants[name] = entry
print(json.dumps(tenants, separators=(",", ":")))
'
) || exit $?

# --- What to do with it ----------------------------------------------------------------------------------

squote() { # one shell word, single-quoted
  printf "'%s'" "${1//\'/\'\\\'\'}"
}

consent_url="$login_host/$tenant_id/adminconsent?client_id=$app_id"
rg_word=$(squote "${resource_group:-<resource-group>}")
app_word=$(squote "${function_app:-<function-app>}")
set_command="az functionapp config appsettings set --resource-group $rg_word --name $app_word --settings $(squote "DEFENDER_TENANTS=$new_value") $(squote "DEFENDER_APP_CLIENT_ID=$app_id") --output none"

cat <<EOF
Onboarding tenant '$name' (TENANT_ID $tenant_id).
  application (DEFENDER_APP_CLIENT_ID): $app_id, from $app_id_from
  current DEFENDER_TENANTS: from $current_from

== 1. Admin consent, by an administrator of the customer tenant

Send this URL to a Privileged Role Administrator or Global Administrator of tenant $tenant_id:

  $consent_url

Signed in with an account of that tenant, they check the application id shown,
  $app_id,
and accept the permission "Read and write all alerts" (Alert.ReadWrite.All of WindowsDefenderATP). That
adds the application to their tenant (Enterprise applications) and grants it the permission there; the
application's Permissions page there shows the grant, whatever page the browser lands on afterwards. The
tenant must have Microsoft Defender for Endpoint.

== 2. The new DEFENDER_TENANTS

$new_value

== 3. Apply it, once the customer has consented (Website Contributor or Contributor on the function app)

  $set_command

Setting app settings restarts the app. A deployment (azd provision, azd up) writes every app setting from
its parameters again: set the parameter to this value in infra/main.parameters.json as well,

  "defenderTenants": { "value": $new_value },

and keep the application id with \`azd env set ALERTGATE_DEFENDER_APP_CLIENT_ID $app_id\`
unless the deployment creates the application (createMultiTenantApp).
EOF

if $apply; then
  echo
  echo "Applying to function app $function_app in $resource_group..."
  az functionapp config appsettings set --resource-group "$resource_group" --name "$function_app" \
    --settings "DEFENDER_TENANTS=$new_value" "DEFENDER_APP_CLIENT_ID=$app_id" --output none ||
    fail "az could not set the app settings (see its message above); nothing else was changed"
  echo "Applied: DEFENDER_TENANTS now names '$name'. The app restarts and reads it."
fi
