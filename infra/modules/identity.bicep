// The one user-assigned managed identity alertgate runs as.
//
// One identity serves both storage (AzureWebJobsStorage__clientId, the deployment container) and MDE
// (AZURE_CLIENT_ID): the MDE app role is granted to it once (infra/grant-defender-permission.sh) and
// survives a redeploy or a replaced function app, which a system-assigned identity would not.

@description('Name of the user-assigned managed identity.')
param name string

@description('Region of the identity.')
param location string

@description('Tags for the identity.')
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
