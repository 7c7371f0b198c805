// Data-plane role assignments: what the managed identity (and, on request, the deploying principal)
// may do in storage and Application Insights.
//
// Shared keys are disabled on the account, so these roles are the only way in:
// - Storage Blob Data Owner: the Functions host's blob leases and keys, and the Flex deployment
//   container (the platform reads the package as the identity).
// - Storage Queue Data Contributor: queue triggers (requests, chunks, poison) and alertgate's own
//   enqueueing of deferred chunks.
// - Storage Table Data Contributor: alertgate's shared state (keys, operations ledger, budget).
// - Monitoring Metrics Publisher: telemetry, since Application Insights accepts Entra-authenticated
//   ingestion only.
// The assignments live in a module so that their names (guid of scope, principal and role) are
// computed from parameters, which ARM needs to know when the deployment starts.

@description('Name of the storage account.')
param storageAccountName string

@description('Name of the Application Insights component.')
param applicationInsightsName string

@description('Principal (object) id of the user-assigned managed identity.')
param identityPrincipalId string

@description('Object id of the deploying user or service principal; empty to assign nothing to it.')
param deployerPrincipalId string = ''

@description('Type of deployerPrincipalId.')
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param deployerPrincipalType string = 'User'

var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}
var storageRoles = [
  roles.storageBlobDataOwner
  roles.storageQueueDataContributor
  roles.storageTableDataContributor
]
var assignDeployer = !empty(deployerPrincipalId)

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource identityStorageRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for roleId in storageRoles: {
    name: guid(storage.id, identityPrincipalId, roleId)
    scope: storage
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)
      principalId: identityPrincipalId
      // Set explicitly so that ARM does not look the new identity up in Entra ID before replication
      // has reached it (the usual cause of PrincipalNotFound right after creation).
      principalType: 'ServicePrincipal'
    }
  }
]

resource identityTelemetryRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(applicationInsights.id, identityPrincipalId, roles.monitoringMetricsPublisher)
  scope: applicationInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// The deploying principal gets the same data roles only when asked (grantDeployerDataAccess in
// main.bicep): handy to look at the tables and queues with Storage Explorer or `az storage --auth-mode
// login`, but not needed to deploy or run alertgate.
resource deployerStorageRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for roleId in storageRoles: if (assignDeployer) {
    name: guid(storage.id, deployerPrincipalId, roleId)
    scope: storage
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)
      principalId: deployerPrincipalId
      principalType: deployerPrincipalType
    }
  }
]
