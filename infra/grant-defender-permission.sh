#!/usr/bin/env bash
# Grants alertgate's managed identity the Alert.ReadWrite.All application permission (app role) of
# Microsoft Defender for Endpoint's API (the WindowsDefenderATP service principal), through Microsoft
# Graph with `az rest`.
#
# ARM (Bicep) cannot do this: app roles live in Entra ID, and there is no portal page for giving one to a
# managed identity. The script is safe to run twice: it looks for an existing assignment first.
set -euo pipefail

DEFENDER_APP_ID=fc780465-2017-40d4-a0c5-307022471b92 # WindowsDefenderATP, the same in every tenant
ROLE_VALUE=Alert.ReadWrite.All
GRAPH_URL=${GRAPH_URL:-https://graph.microsoft.com}

usage() {
  cat <<EOF
Usage: infra/grant-defender-permission.sh [--graph-url URL] [PRINCIPAL_ID]

Gives the managed identity with object (principal) id PRINCIPAL_ID the $ROLE_VALUE app role of
WindowsDefenderATP ($DEFENDER_APP_ID), so that alertgate can update MDE alerts.

PRINCIPAL_ID defaults to ALERTGATE_IDENTITY_PRINCIPAL_ID from \`azd env get-values\` (set by azd up).

  --graph-url URL  Microsoft Graph endpoint (default $GRAPH_URL; US Gov L4 https://graph.microsoft.us,
                   DoD https://dod-graph.microsoft.us). Or set GRAPH_URL.
  -h, --help       This help.

Needs: az CLI logged in (az login) as a user who may grant application permissions in the tenant:
Privileged Role Administrator or Global Administrator. (Microsoft documents Cloud Application
Administrator and Application Administrator as enough for app roles of APIs other than Microsoft Graph,
which WindowsDefenderATP is; your tenant's policies decide.)

A new role reaches tokens only when the identity gets a new token, which can take a while (managed
identity tokens are cached, for up to 24 hours). Until then MDE answers 403 and alertgate answers 502
with a hint; it does not retry a 403 by itself, so re-submit (the same Idempotency-Key is safe) once the
role is in the token.
EOF
}

principal_id=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --graph-url)
      [ $# -ge 2 ] || { echo "--graph-url needs a URL" >&2; exit 2; }
      GRAPH_URL=$2
      shift 2
      ;;
    -*)
      echo "unknown option: $1 (see --help)" >&2
      exit 2
      ;;
    *)
      [ -z "$principal_id" ] || { echo "one PRINCIPAL_ID only (see --help)" >&2; exit 2; }
      principal_id=$1
      shift
      ;;
  esac
done
GRAPH_URL=${GRAPH_URL%/}

command -v az >/dev/null || { echo "The Azure CLI (az) is needed: https://aka.ms/azure-cli" >&2; exit 1; }

if [ -z "$principal_id" ]; then
  command -v azd >/dev/null || { echo "No PRINCIPAL_ID given and azd not found (see --help)." >&2; exit 2; }
  # Read the one value instead of sourcing `azd env get-values`: its output is data, not a script.
  principal_id=$(azd env get-values | sed -n 's/^ALERTGATE_IDENTITY_PRINCIPAL_ID="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p')
  [ -n "$principal_id" ] || {
    echo "ALERTGATE_IDENTITY_PRINCIPAL_ID is not in the azd environment: run azd up first, or pass PRINCIPAL_ID." >&2
    exit 2
  }
fi
if ! [[ "$principal_id" =~ ^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$ ]]; then
  echo "PRINCIPAL_ID must be an object id (a GUID), got '$principal_id'." >&2
  exit 2
fi

az account show --query "{tenant: tenantId, user: user.name}" -o tsv >/dev/null 2>&1 || {
  echo "Not logged in: run az login (as a Privileged Role Administrator or Global Administrator)." >&2
  exit 1
}

echo "Identity (principal id): $principal_id"
identity_name=$(az rest --method GET --url "$GRAPH_URL/v1.0/servicePrincipals/$principal_id" \
  --query displayName -o tsv) || {
  echo "No service principal with object id $principal_id in this tenant (is it the principal id, not the client id?)." >&2
  exit 1
}
echo "Identity name: $identity_name"

resource_id=$(az rest --method GET --url "$GRAPH_URL/v1.0/servicePrincipals(appId='$DEFENDER_APP_ID')" \
  --query id -o tsv) || {
  echo "WindowsDefenderATP ($DEFENDER_APP_ID) has no service principal in this tenant: is Microsoft Defender for Endpoint set up here?" >&2
  exit 1
}
echo "WindowsDefenderATP service principal: $resource_id"

role_id=$(az rest --method GET --url "$GRAPH_URL/v1.0/servicePrincipals/$resource_id" \
  --query "appRoles[?value=='$ROLE_VALUE' && contains(allowedMemberTypes, 'Application')].id | [0]" -o tsv)
if [ -z "$role_id" ] || [ "$role_id" = "None" ]; then
  echo "WindowsDefenderATP offers no application role $ROLE_VALUE in this tenant." >&2
  exit 1
fi
echo "App role $ROLE_VALUE: $role_id"

existing=$(az rest --method GET --url "$GRAPH_URL/v1.0/servicePrincipals/$principal_id/appRoleAssignments" \
  --query "value[?resourceId=='$resource_id' && appRoleId=='$role_id'].id | [0]" -o tsv)
if [ -n "$existing" ] && [ "$existing" != "None" ]; then
  echo "Already granted: $identity_name has $ROLE_VALUE (assignment $existing). Nothing to do."
  exit 0
fi

body=$(printf '{"principalId": "%s", "resourceId": "%s", "appRoleId": "%s"}' "$principal_id" "$resource_id" "$role_id")
assignment=$(az rest --method POST --url "$GRAPH_URL/v1.0/servicePrincipals/$principal_id/appRoleAssignments" \
  --headers "Content-Type=application/json" --body "$body" --query id -o tsv)
echo "Granted: $identity_name has $ROLE_VALUE of WindowsDefenderATP (assignment $assignment)."
cat <<EOF

The role reaches alertgate's tokens when its identity gets a new one: that can take a while (managed
identity tokens are cached, for up to 24 hours). Until then MDE answers 403 and alertgate answers 502
"MDE refused alertgate's identity"; it does not retry a 403 by itself. Re-submit then (the same
Idempotency-Key, or the same Sentinel incident, is safe to send again).
EOF
