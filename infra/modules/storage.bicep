// The storage account: the Functions host's own storage, the deployment package container, and
// alertgate's shared state (tables) and queues.
//
// Shared-key access is off, so nothing here can be reached with an account key or a SAS made from one:
// the function app, the Flex deployment and operators all authenticate with Entra ID and need the data
// roles that rbac.bicep assigns. The tables and queues are created here (alertgate also creates them on
// first use) so that a deployment is complete and inspectable before the first request arrives.

@description('Storage account name: 3-24 lowercase letters and digits, unique in Azure.')
@minLength(3)
@maxLength(24)
param name string

@description('Region of the account.')
param location string

@description('Tags for the account.')
param tags object = {}

@description('Replication. alertgate keeps short-lived state (operations and keys live IDEMPOTENCY_TTL_SECONDS); choose a zone-redundant SKU where the region has zones and losing in-flight operations to a zone outage matters.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
  'Standard_RAGRS'
  'Standard_RAGZRS'
])
param skuName string = 'Standard_LRS'

@description('Blob container the Flex Consumption plan deploys the app package to.')
param deploymentContainerName string

@description('Tables alertgate keeps its shared state in (<TABLE_PREFIX>Keys, Operations, Budget).')
param tableNames array

@description('Queues alertgate reads: REQUESTS_QUEUE, CHUNKS_QUEUE and their -poison queues.')
param queueNames array

@description('Days a deleted blob or container can be restored (the deployment package).')
@minValue(1)
@maxValue(365)
param deleteRetentionDays int = 7

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35: Flex Consumption without VNet integration reaches storage over its public endpoint; a default-deny firewall would lock the app out. Access needs an Entra token and a data role (shared keys are off); put the app in a VNet with private endpoints to close the endpoint.
  // checkov:skip=CKV_AZURE_59: Same reason as CKV_AZURE_35: public network access stays enabled for an app without VNet integration; authorization is Entra ID only (shared keys are off).
  // checkov:skip=CKV_AZURE_206: Replication is the skuName parameter (LRS by default, ZRS/GZRS allowed): the state is short-lived and not every Flex region has zones.
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: skuName
  }
  properties: {
    accessTier: 'Hot'
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    // Identity only: no account keys, no account-key SAS. The Functions host, the Flex deployment and
    // alertgate's own Table/Queue clients all use the managed identity.
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowCrossTenantReplication: false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    // A deleted package or container can be restored: the app runs from the package in this container.
    deleteRetentionPolicy: {
      enabled: true
      days: deleteRetentionDays
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: deleteRetentionDays
    }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource tables 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = [
  for tableName in tableNames: {
    parent: tableService
    name: tableName
  }
]

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource queues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [
  for queueName in queueNames: {
    parent: queueService
    name: queueName
  }
]

output name string = storage.name
output id string = storage.id
output blobEndpoint string = storage.properties.primaryEndpoints.blob
