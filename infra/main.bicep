// alertgate on Azure: everything `azd up` provisions, in one resource group.
//
// A Flex Consumption (FC1) Linux Python function app that runs as one user-assigned managed identity;
// a storage account reached with that identity only (shared keys off) holding the host's storage, the
// deployment package, alertgate's tables and queues; Application Insights on a Log Analytics
// workspace, with a workbook and alert rules over alertgate's telemetry (modules/operations.bicep); the
// data-plane role assignments; every alertgate setting of docs/contracts.md §4 from a parameter
// whose default is the documented default (README "Settings"). The MDE permission is an Entra app role,
// which ARM cannot grant: infra/grant-defender-permission.sh does it after `azd up`. With
// createMultiTenantApp, also the multi-tenant Entra application through which alertgate serves customer
// tenants (modules/multitenant-app.bicep, Microsoft Graph Bicep extension; docs/tenants.md).
//
// tests/infra/test_settings_consistency.py reads this file: every UPPER_SNAKE_CASE object key is an
// app setting, and each alertgate setting must come from a parameter whose default is the code's.

targetScope = 'subscription'

// --- Where and how big ---------------------------------------------------------------------------------

@minLength(1)
@maxLength(64)
@description('azd environment name: names the resource group (rg-<name>) and seeds the unique suffix of the resource names.')
param environmentName string

@minLength(1)
@description('Region of every resource; it must offer Flex Consumption (`az functionapp list-flexconsumption-locations`).')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Resource group to create or use; empty for rg-<environmentName>.')
param resourceGroupName string = ''

@description('Function app name (the host name <name>.azurewebsites.net); empty for func-alertgate-<suffix>.')
param functionAppName string = ''

@description('Most instances the app scales out to (Flex Consumption allows 40-1000).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Memory of each instance in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Replication of the storage account.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
  'Standard_RAGRS'
  'Standard_RAGZRS'
])
param storageSku string = 'Standard_LRS'

@description('Days Log Analytics keeps alertgate\'s logs and telemetry.')
@minValue(30)
@maxValue(730)
param logRetentionInDays int = 30

// --- The deploying principal -----------------------------------------------------------------------------

@description('Object id of the deploying user or service principal (azd fills AZURE_PRINCIPAL_ID).')
param principalId string = ''

@description('Type of principalId.')
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param principalType string = 'User'

@description('Also give principalId the storage data roles (to inspect tables and queues); not needed to deploy.')
param grantDeployerDataAccess bool = false

// --- Optional caller authentication with Microsoft Entra ID (App Service authentication) -------------------

@description('Require an Entra ID token (from an allowed client application) on every call, in addition to the function key.')
param enableEntraAuth bool = false

@description('Client (application) id of the app registration that represents alertgate\'s API (required when enableEntraAuth).')
param entraAppClientId string = ''

@description('Comma-separated client application ids allowed to call alertgate (for example the playbook\'s managed identity); empty allows any application of the tenant with a token for the API.')
param allowedClientApplicationIds string = ''

@description('Token issuer; empty for https://login.microsoftonline.com/<tenant>/v2.0 (this cloud\'s login endpoint).')
param entraOpenIdIssuer string = ''

// --- alertgate's settings (docs/contracts.md §4, README "Settings"); defaults are the documented defaults -----------

@description('DEFENDER_API_BASE_URL: MDE API host, e.g. https://eu.api.security.microsoft.com; GCC https://api-gcc.securitycenter.microsoft.us; GCC High/DoD https://api-gov.securitycenter.microsoft.us.')
param defenderApiBaseUrl string = 'https://api.security.microsoft.com'

@description('DEFENDER_TOKEN_SCOPE: token scope for MDE, kept separate from the host.')
param defenderTokenScope string = 'https://api.securitycenter.microsoft.com/.default'

@description('AZURE_AUTHORITY_HOST for azure-identity: https://login.microsoftonline.us for GCC High / DoD; empty keeps azure-identity\'s default (the setting is then not set).')
param azureAuthorityHost string = ''

@description('ALERT_ID_PATTERN: full-match regular expression of an MDE alert id (ASCII digits).')
param alertIdPattern string = '^(?:[a-z]{2})?\\d{18}_-?\\d{1,20}$'

@description('DEFENDER_RATE_LIMITS: calls/seconds per window, comma-separated; MDE allows 10 a minute and 500 an hour.')
param defenderRateLimits string = '10/60,500/3600'

@description('DEFENDER_PATCH_RATE_LIMITS: the single-alert PATCH API\'s own budget, calls/seconds per window (MDE documents 100 a minute and 1500 an hour); off turns that channel off.')
param defenderPatchRateLimits string = '100/60,1500/3600'

@description('PATCH_MAX_ALERTS: the most alerts a waiting update may have to go out as one PATCH call per alert.')
@minValue(1)
@maxValue(99)
param patchMaxAlerts int = 10

@description('RATE_LIMIT_SAFETY_MARGIN_SECONDS: added to every window for clock skew (decimals allowed).')
param rateLimitSafetyMarginSeconds string = '1'

@description('DEFENDER_MAX_ALERTS_PER_CALL: ids per MDE call; lowered automatically on MaximumBatchSizeExceeded.')
@minValue(1)
@maxValue(900)
param defenderMaxAlertsPerCall int = 500

@description('MAX_ALERTS_PER_REQUEST: distinct alert ids per request.')
@minValue(1)
@maxValue(50000)
param maxAlertsPerRequest int = 10000

@description('MAX_BODY_BYTES: larger bodies get 413.')
@minValue(1)
param maxBodyBytes int = 1048576

@description('DEFENDER_ENUM_OVERRIDES: canonical value -> outbound spelling, e.g. {"NotMalicious": "Clean"}.')
param defenderEnumOverrides object = {}

@description('RESEND_UNKNOWN_WITH_COMMENT: re-send a chunk with a comment whose outcome is unknown (MDE appends comments, so it may appear twice).')
param resendUnknownWithComment bool = false

@description('IDEMPOTENCY_TTL_SECONDS: how long explicit idempotency keys and operations are kept.')
param idempotencyTtlSeconds string = '86400'

@description('DERIVED_KEY_TTL_SECONDS: how long a key derived from an unkeyed body is kept.')
param derivedKeyTtlSeconds string = '600'

@description('SYNC_MAX_WAIT_SECONDS: how long the HTTP path may wait for budget before deferring.')
param syncMaxWaitSeconds string = '5'

@description('DEFENDER_HTTP_TIMEOUT_SECONDS: total timeout of one MDE call.')
param defenderHttpTimeoutSeconds string = '30'

@description('REQUESTS_QUEUE: inbound queue for other services (its -poison queue is created too).')
@minLength(3)
@maxLength(56)
param requestsQueue string = 'alert-update-requests'

@description('CHUNKS_QUEUE: internal queue of deferred chunks (its -poison queue is created too).')
@minLength(3)
@maxLength(56)
param chunksQueue string = 'alert-update-chunks'

@description('TABLE_PREFIX: prefix of the tables <prefix>Keys, <prefix>Operations, <prefix>Budget.')
@minLength(1)
@maxLength(53)
param tablePrefix string = 'alertgate'

@description('MAX_ATTEMPTS: attempts per chunk before it fails.')
@minValue(1)
param maxAttempts int = 12

@description('SENTINEL_MAPPING: overrides of the Sentinel -> MDE classification mapping, e.g. {"FalsePositive/IncorrectAlertLogic": {"classification": "FalsePositive", "determination": "Other"}}.')
param sentinelMapping object = {}

@description('SENTINEL_DEFAULT_ASSIGNEE: assignedTo when an incident has no owner; empty sends none.')
param sentinelDefaultAssignee string = ''

@description('SWEEP_SCHEDULE: six-field NCRONTAB schedule of the sweep that resolves what a crashed process left.')
param sweepSchedule string = '*/30 * * * * *'

@description('SWEEP_GRACE_SECONDS: how long past its due time a chunk may go unhandled before the sweep re-queues it.')
param sweepGraceSeconds string = '60'

@description('DEFENDER_TENANTS: the customer tenants served besides the home tenant, {"<name>": {"tenantId": "<GUID>", "apiBaseUrl"?, "tokenScope"?, "rateLimits"?, "patchRateLimits"?, "sentinelWorkspaceIds"?: ["<GUID>"]}}, names ^[a-z0-9-]{1,32}$ (not home); infra/onboard-tenant.sh prints the value with one more tenant.')
param defenderTenants object = {}

@description('DEFENDER_APP_CLIENT_ID: client id of the multi-tenant application whose federated credential trusts the identity; required once defenderTenants names a tenant. Empty with createMultiTenantApp: the created application\'s.')
param defenderAppClientId string = ''

@description('REQUIRE_TENANT_ROLES: with App Service authentication a caller needs the app role Tenants.All or Tenant.<name> to act on a tenant, and function-key callers reach only the home tenant.')
param requireTenantRoles bool = false

// --- Several tenants: the multi-tenant application (docs/tenants.md) --------------------------------------

@description('Create the multi-tenant Entra application, its federated credential trusting the identity and its service principal (Microsoft Graph Bicep extension, public cloud only); the deploying user needs Application Administrator or Cloud Application Administrator.')
param createMultiTenantApp bool = false

@description('Display name of the multi-tenant application: what customers\' administrators see when they consent.')
@minLength(1)
@maxLength(256)
param multiTenantAppDisplayName string = 'alertgate'

@description('Id of WindowsDefenderATP\'s Alert.ReadWrite.All app role, for a home tenant without WindowsDefenderATP\'s service principal; empty looks it up there.')
param defenderAlertRoleId string = ''

// --- Operations: the workbook and the alert rules (modules/operations.bicep, docs/telemetry.md) -------------

@description('Resource id of an existing action group (email, SMS, Teams, a webhook) that alertgate\'s alert rules notify; empty creates the rules without actions: they still fire and show in Azure Monitor > Alerts.')
param alertActionGroupId string = ''

@description('Alert when the oldest pending update (alertgate.backlog.oldest_age) is older than this many minutes.')
@minValue(1)
@maxValue(1440)
param oldestPendingAlertMinutes int = 15

// --- Names -----------------------------------------------------------------------------------------------

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
  application: 'alertgate'
}
var appName = !empty(functionAppName) ? functionAppName : 'func-alertgate-${resourceToken}'
var deploymentContainerName = 'app-package-${resourceToken}'
// "id1, id2" -> ['id1', 'id2'] (spaces dropped: application ids never contain any).
var allowedClientApps = empty(trim(allowedClientApplicationIds)) ? [] : split(replace(trim(allowedClientApplicationIds), ' ', ''), ',')

// The tables and queues the app uses with these settings (shared/tables.py, function_app.py).
var tableNames = [
  '${tablePrefix}Keys'
  '${tablePrefix}Operations'
  '${tablePrefix}Budget'
]
var queueNames = [
  requestsQueue
  '${requestsQueue}-poison'
  chunksQueue
  '${chunksQueue}-poison'
]

// alertgate's own app settings: exactly shared.settings.names_read() - PLATFORM_NAMES (checked by
// tests/infra/test_settings_consistency.py against the code and local.settings.sample.json).
var alertgateAppSettings = {
  AZURE_CLIENT_ID: identity.outputs.clientId
  DEFENDER_API_BASE_URL: defenderApiBaseUrl
  DEFENDER_TOKEN_SCOPE: defenderTokenScope
  ALERT_ID_PATTERN: alertIdPattern
  DEFENDER_RATE_LIMITS: defenderRateLimits
  DEFENDER_PATCH_RATE_LIMITS: defenderPatchRateLimits
  PATCH_MAX_ALERTS: string(patchMaxAlerts)
  RATE_LIMIT_SAFETY_MARGIN_SECONDS: rateLimitSafetyMarginSeconds
  DEFENDER_MAX_ALERTS_PER_CALL: string(defenderMaxAlertsPerCall)
  MAX_ALERTS_PER_REQUEST: string(maxAlertsPerRequest)
  MAX_BODY_BYTES: string(maxBodyBytes)
  DEFENDER_ENUM_OVERRIDES: string(defenderEnumOverrides)
  RESEND_UNKNOWN_WITH_COMMENT: string(resendUnknownWithComment)
  IDEMPOTENCY_TTL_SECONDS: idempotencyTtlSeconds
  DERIVED_KEY_TTL_SECONDS: derivedKeyTtlSeconds
  SYNC_MAX_WAIT_SECONDS: syncMaxWaitSeconds
  DEFENDER_HTTP_TIMEOUT_SECONDS: defenderHttpTimeoutSeconds
  REQUESTS_QUEUE: requestsQueue
  CHUNKS_QUEUE: chunksQueue
  TABLE_PREFIX: tablePrefix
  MAX_ATTEMPTS: string(maxAttempts)
  SENTINEL_MAPPING: string(sentinelMapping)
  SENTINEL_DEFAULT_ASSIGNEE: sentinelDefaultAssignee
  SWEEP_SCHEDULE: sweepSchedule
  SWEEP_GRACE_SECONDS: sweepGraceSeconds
  DEFENDER_TENANTS: string(defenderTenants)
  DEFENDER_APP_CLIENT_ID: defenderAppClientId
  REQUIRE_TENANT_ROLES: string(requireTenantRoles)
}

// DEFENDER_APP_CLIENT_ID left empty takes the client id of the application created here (union: the
// later object's value wins).
var createdAppSettings = createMultiTenantApp && empty(defenderAppClientId) ? {
  DEFENDER_APP_CLIENT_ID: multiTenantApp!.outputs.appId
} : {}

// azure-identity's own variable, set only when given: an empty value would not mean "the default" to it.
var authorityHostAppSettings = empty(azureAuthorityHost) ? {} : {
  AZURE_AUTHORITY_HOST: azureAuthorityHost
}

// --- Resources -------------------------------------------------------------------------------------------

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: !empty(resourceGroupName) ? resourceGroupName : 'rg-${environmentName}'
  location: location
  tags: tags
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-alertgate-${resourceToken}'
    location: location
    tags: tags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: 'log-alertgate-${resourceToken}'
    applicationInsightsName: 'appi-alertgate-${resourceToken}'
    location: location
    tags: tags
    retentionInDays: logRetentionInDays
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'stalertgate${take(resourceToken, 13)}'
    location: location
    tags: tags
    skuName: storageSku
    deploymentContainerName: deploymentContainerName
    tableNames: tableNames
    queueNames: queueNames
  }
}

module rbac 'modules/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    storageAccountName: storage.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    identityPrincipalId: identity.outputs.principalId
    deployerPrincipalId: grantDeployerDataAccess ? principalId : ''
    deployerPrincipalType: principalType
  }
}

// The multi-tenant application customers consent to; its only credential is the identity.
module multiTenantApp 'modules/multitenant-app.bicep' = if (createMultiTenantApp) {
  name: 'multitenant-app'
  scope: rg
  params: {
    uniqueName: 'alertgate-tenants-${resourceToken}'
    displayName: multiTenantAppDisplayName
    identityPrincipalId: identity.outputs.principalId
    defenderAlertRoleId: defenderAlertRoleId
  }
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  scope: rg
  // The host starts as soon as the app exists: let it find its storage roles in place.
  dependsOn: [
    rbac
  ]
  params: {
    name: appName
    planName: 'plan-alertgate-${resourceToken}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerName: deploymentContainerName
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    appSettings: union(alertgateAppSettings, createdAppSettings, authorityHostAppSettings)
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    enableEntraAuth: enableEntraAuth
    entraAppClientId: entraAppClientId
    entraOpenIdIssuer: entraOpenIdIssuer
    allowedClientApplicationIds: allowedClientApps
  }
}

// The operator's view: a workbook over alertgate's telemetry and the alert rules, on the component.
module operations 'modules/operations.bicep' = {
  name: 'operations'
  scope: rg
  params: {
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    location: location
    tags: tags
    alertRuleNamePrefix: 'alertgate-${resourceToken}'
    actionGroupId: alertActionGroupId
    oldestPendingAlertMinutes: oldestPendingAlertMinutes
  }
}

// --- Outputs (azd stores them in the environment: `azd env get-values`); no secrets ------------------------

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_APP_RESOURCE_ID string = functionApp.outputs.id
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output ALERTGATE_HOST_NAME string = functionApp.outputs.defaultHostName
output ALERTGATE_API_URL string = 'https://${functionApp.outputs.defaultHostName}/api'
output ALERTGATE_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output ALERTGATE_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output ALERTGATE_IDENTITY_RESOURCE_ID string = identity.outputs.id
output ALERTGATE_ENTRA_AUTH bool = enableEntraAuth
// DEFENDER_APP_CLIENT_ID as deployed (infra/onboard-tenant.sh reads it); a name of its own, so that azd
// does not feed it back into defenderAppClientId.
output ALERTGATE_MULTITENANT_APP_CLIENT_ID string = !empty(defenderAppClientId) ? defenderAppClientId : (createMultiTenantApp ? multiTenantApp!.outputs.appId : '')
