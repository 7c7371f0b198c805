// Lets the playbook's managed identity read the one secret that holds alertgate's function key.
//
// Scoped to the secret, not the vault: the playbook needs that key and nothing else. The secret must
// exist before this deploys (README "Deploy to Azure" stores it first). The vault must use the Azure RBAC
// permission model; with access policies, add a "Get secret" policy for the identity instead.

@description('Name of the Key Vault (Azure RBAC permission model).')
param keyVaultName string

@description('Name of the secret holding the function key.')
param secretName string

@description('Object id of the playbook\'s managed identity.')
param principalId string

var keyVaultSecretsUser = '4633458b-17de-408a-b874-0445c86b69e6'

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource secret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' existing = {
  parent: vault
  name: secretName
}

resource readSecret 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(secret.id, principalId, keyVaultSecretsUser)
  scope: secret
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUser)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
