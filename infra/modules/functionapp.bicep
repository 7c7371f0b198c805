// The Flex Consumption (FC1) plan and the Linux Python function app that runs alertgate.
//
// The app runs as the user-assigned identity for everything: host storage (identity-based
// AzureWebJobsStorage__* settings), the deployment package (functionAppConfig.deployment with
// UserAssignedIdentity), telemetry (APPLICATIONINSIGHTS_AUTHENTICATION_STRING) and MDE (AZURE_CLIENT_ID,
// passed in appSettings by main.bicep). Flex Consumption takes the runtime from functionAppConfig, so
// FUNCTIONS_WORKER_RUNTIME / FUNCTIONS_EXTENSION_VERSION are deliberately not set (they are deprecated
// on this plan and the platform manages them).

@description('Function app name; also the host name: <name>.azurewebsites.net.')
param name string

@description('Flex Consumption plan name (one app per Flex plan).')
param planName string

@description('Region of the plan and the app; it must offer Flex Consumption.')
param location string

@description('Tags for the plan and the app.')
param tags object = {}

@description('azd service name in azure.yaml: azd finds the app to deploy to by this tag.')
param serviceName string = 'api'

@description('Resource id of the user-assigned managed identity.')
param identityId string

@description('Client id of the user-assigned managed identity.')
param identityClientId string

@description('Storage account for the Functions host, the deployment package and alertgate state.')
param storageAccountName string

@description('Blob container that holds the deployment package.')
param deploymentContainerName string

@description('Application Insights component the app sends telemetry to.')
param applicationInsightsName string

@description('alertgate\'s own app settings (docs/contracts.md §4), built in main.bicep.')
param appSettings object

@description('Python version of the Flex Consumption runtime.')
@allowed([
  '3.11'
])
param pythonVersion string = '3.11'

@description('Most instances the app scales out to. alertgate\'s MDE budget is shared through Table Storage, so more instances do not send more calls; they only take in more requests.')
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

@description('Require a Microsoft Entra ID token from callers (App Service authentication) in addition to the function key.')
param enableEntraAuth bool = false

@description('Client (application) id of the app registration that represents alertgate\'s API; required when enableEntraAuth.')
param entraAppClientId string = ''

@description('Token issuer; empty for this tenant\'s v2.0 issuer.')
param entraOpenIdIssuer string = ''

@description('Accepted token audiences; empty for the app registration\'s client id and api://<client id>.')
param entraAllowedAudiences array = []

@description('Client application ids allowed to call (the appid/azp claim of their tokens): the playbook\'s managed identity, services. Empty allows any application of the tenant that can get a token for the audience.')
param allowedClientApplicationIds array = []

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

// The Functions host and alertgate's own storage clients both derive https://<account>.<service>.core.
// windows.net from the account name. Other clouds (US Government, China) have other suffixes, so there
// the three service URIs are given explicitly (alertgate reads __tableServiceUri/__queueServiceUri too).
var publicCloudStorage = environment().suffixes.storage == 'core.windows.net'
var storageServiceUris = publicCloudStorage ? {} : {
  AzureWebJobsStorage__blobServiceUri: storage.properties.primaryEndpoints.blob
  AzureWebJobsStorage__queueServiceUri: storage.properties.primaryEndpoints.queue
  AzureWebJobsStorage__tableServiceUri: storage.properties.primaryEndpoints.table
}

// The platform's settings, in the allow-list of tests/infra/test_settings_consistency.py.
var identityStorageSettings = {
  AzureWebJobsStorage__accountName: storage.name
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
}
// Telemetry (docs/telemetry.md): host.json's telemetryMode OpenTelemetry plus
// PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY make the Python worker configure the Azure Monitor exporter
// for alertgate's OpenTelemetry metrics and events; both the host and that exporter send to the
// connection string's component, authenticated as the identity (the component has local authentication
// disabled). tests/infra/test_settings_consistency.py checks these are set.
var telemetrySettings = {
  APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsights.properties.ConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
  PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY: 'true'
}
var platformAppSettings = union(identityStorageSettings, telemetrySettings, storageServiceUris)

var defaultAudiences = [
  entraAppClientId
  'api://${entraAppClientId}'
]
var audienceValidation = {
  allowedAudiences: empty(entraAllowedAudiences) ? defaultAudiences : entraAllowedAudiences
}
var clientApplicationValidation = empty(allowedClientApplicationIds) ? {} : {
  defaultAuthorizationPolicy: {
    allowedApplications: allowedClientApplicationIds
  }
}

var entraProviders = enableEntraAuth ? {
  azureActiveDirectory: {
    enabled: true
    registration: {
      clientId: entraAppClientId
      openIdIssuer: empty(entraOpenIdIssuer) ? '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0' : entraOpenIdIssuer
    }
    // No list of client applications, no restriction: any application of the tenant with a token for
    // one of the audiences may call.
    validation: union(audienceValidation, clientApplicationValidation)
  }
} : {}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225: Zone redundancy needs a region with availability zones and zone-redundant storage; not every Flex region has zones. Set properties.zoneRedundant with storageSku Standard_ZRS where they exist.
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true // Linux
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222: Public network access is how Logic Apps, Sentinel playbooks and services reach the API; every route needs a function key (and, with enableEntraAuth, an Entra token). Add access restrictions or a private endpoint to narrow it.
  // checkov:skip=CKV_AZURE_78: Flex Consumption has no FTP/FTPS endpoint and rejects siteConfig.ftpsState (deprecated on this plan); SCM basic-auth publishing is disabled below.
  // checkov:skip=CKV_AZURE_17: Callers are Logic Apps and services that authenticate with a function key or an Entra token; requiring client certificates would lock them out.
  // checkov:skip=CKV_AZURE_212: Flex Consumption scales from zero on demand and fails over by starting new instances; always-ready instances would bill around the clock for a bursty, rate-limited workload.
  // checkov:skip=CKV_AZURE_213: App Service health check cannot send a function key, so /api/health (auth level FUNCTION) would answer it 401; monitor /api/health with a keyed availability test instead.
  name: name
  location: location
  tags: union(tags, { 'azd-service-name': serviceName })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    publicNetworkAccess: 'Enabled'
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      http20Enabled: true
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          // The platform fetches the package as the identity: no storage key or SAS in a setting.
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }

  // The whole set of app settings: a redeploy resets a setting changed by hand to its parameter.
  resource settings 'config' = {
    name: 'appsettings'
    properties: union(appSettings, platformAppSettings)
  }

  // No publishing with user name and password: azd and `func azure functionapp publish` deploy to Flex
  // with an Entra token.
  resource scmBasicAuth 'basicPublishingCredentialsPolicies' = {
    name: 'scm'
    properties: {
      allow: false
    }
  }
}

// Optional caller authentication with Microsoft Entra ID (App Service authentication). With it on, a
// call needs a token for the app registration (else 401) and still the function key (the routes keep
// auth level FUNCTION), and alertgate records the caller from the X-MS-CLIENT-PRINCIPAL-* headers App
// Service adds (shared/api.py caller_of). alertgate believes those headers only when App Service sets
// WEBSITE_AUTH_ENABLED=True, which it does with the platform enabled; never set that app setting here,
// or forged headers would be believed without authentication. The resource is always deployed, with the
// platform enabled or not, so that setting enableEntraAuth back to false really turns authentication
// off again.
resource authSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  // checkov:skip=CKV_AZURE_13: App Service authentication is the enableEntraAuth parameter, off by default because it needs an app registration that a template cannot create; every route needs a function key either way.
  // checkov:skip=CKV_AZURE_63: false positive: checkov applies the checks of a site's web configuration to every Microsoft.Web/sites/config resource; this is authsettingsV2, and HTTP logs of a Flex app go to Application Insights.
  // checkov:skip=CKV_AZURE_65: false positive: checkov applies the checks of a site's web configuration to every Microsoft.Web/sites/config resource; this is authsettingsV2 (detailed error pages are a web-config property).
  // checkov:skip=CKV_AZURE_66: false positive: checkov applies the checks of a site's web configuration to every Microsoft.Web/sites/config resource; this is authsettingsV2 (failed request tracing is a web-config property).
  // checkov:skip=CKV_AZURE_80: false positive: checkov applies the checks of a site's web configuration to every Microsoft.Web/sites/config resource; this is authsettingsV2, and a .NET Framework version does not apply to a Python app.
  // checkov:skip=CKV_AZURE_88: false positive: checkov applies the checks of a site's web configuration to every Microsoft.Web/sites/config resource; this is authsettingsV2, and Flex runs from the blob deployment container, not Azure Files.
  // checkov:skip=CKV_AZURE_222: false positive: checkov applies the checks of a site's web configuration to every Microsoft.Web/sites/config resource; public network access is a site property, skipped with its reason on the site.
  parent: site
  name: 'authsettingsV2'
  properties: {
    platform: {
      enabled: enableEntraAuth
    }
    globalValidation: {
      requireAuthentication: enableEntraAuth
      // An API answers 401; a redirect to a login page would only confuse a Logic App.
      unauthenticatedClientAction: 'Return401'
    }
    httpSettings: {
      requireHttps: true
    }
    identityProviders: entraProviders
    login: {
      // Service-to-service calls carry their own bearer token; nothing to store.
      tokenStore: {
        enabled: false
      }
    }
  }
}

output name string = site.name
output id string = site.id
output defaultHostName string = site.properties.defaultHostName
