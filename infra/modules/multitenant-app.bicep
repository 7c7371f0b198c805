// The multi-tenant Entra application through which alertgate reaches customer tenants without a secret
// (docs/tenants.md), created with the Microsoft Graph Bicep extension (infra/bicepconfig.json: Microsoft
// Graph v1.0 types 1.0.0, which need Bicep 0.36.1 or later; public cloud only).
//
// - The application is multi-tenant (AzureADMultipleOrgs) and lists one application permission, the app
//   role Alert.ReadWrite.All of WindowsDefenderATP: that list is what a customer's administrator grants
//   by consenting. It grants nothing in the home tenant, where alertgate uses its managed identity.
// - Its only credential is a federated identity credential that trusts the user-assigned managed
//   identity: issuer this tenant's v2.0 authority, subject the identity's principal (object) id,
//   audience api://AzureADTokenExchange (the audience of the public cloud, the one alertgate asks for).
//   An application holds at most 20 such credentials; alertgate needs one.
// - A service principal makes the application usable in its own tenant.
//
// Deploying it needs Application Administrator or Cloud Application Administrator in this tenant (or
// Application Developer, where users may not create applications). uniqueName makes it idempotent: a
// redeploy updates the same application and keeps its client id.
//
// scripts/checkov.sh cannot parse this file (its Bicep parser does not know the `extension` statement),
// so infra/.checkov.yaml leaves it out; checkov has no check for Microsoft.Graph types anyway. The skip
// below is for the secrets scan, should the file be scanned again.

extension microsoftGraphV1

@description('uniqueName of the application: its key in Entra ID, so that a redeploy finds the same application.')
@minLength(1)
@maxLength(120)
param uniqueName string

@description('Display name: what a customer\'s administrator sees on the consent page and under Enterprise applications.')
@minLength(1)
@maxLength(256)
param displayName string

@description('Principal (object) id of the user-assigned managed identity the federated credential trusts.')
param identityPrincipalId string

@description('Id of WindowsDefenderATP\'s Alert.ReadWrite.All app role; empty looks it up by its value on WindowsDefenderATP\'s service principal in this tenant (which then must exist).')
param defenderAlertRoleId string = ''

var defenderAppId = 'fc780465-2017-40d4-a0c5-307022471b92' // WindowsDefenderATP, the same in every tenant
var alertRoleValue = 'Alert.ReadWrite.All'
// checkov:skip=CKV_SECRET_6: not a secret: the public cloud's token-exchange audience, which checkov's entropy check takes for Base64
var tokenExchangeAudience = 'api://AzureADTokenExchange'

resource defender 'Microsoft.Graph/servicePrincipals@v1.0' existing = if (empty(defenderAlertRoleId)) {
  appId: defenderAppId
}

// The application role (not the delegated permission of the same name) with that value.
var alertRoleId = !empty(defenderAlertRoleId) ? defenderAlertRoleId : filter(defender!.appRoles, role => role.value == alertRoleValue && contains(role.allowedMemberTypes, 'Application'))[0].id

resource app 'Microsoft.Graph/applications@v1.0' = {
  uniqueName: uniqueName
  displayName: displayName
  description: 'alertgate: updates Microsoft Defender for Endpoint alerts in the tenants that consented to it.'
  signInAudience: 'AzureADMultipleOrgs'
  requiredResourceAccess: [
    {
      resourceAppId: defenderAppId
      resourceAccess: [
        {
          id: alertRoleId
          type: 'Role'
        }
      ]
    }
  ]

  // Child resources of the Graph extension take the full name: <application uniqueName>/<credential name>.
  resource managedIdentityCredential 'federatedIdentityCredentials@v1.0' = {
    name: '${app.uniqueName}/alertgate-managed-identity'
    description: 'alertgate\'s user-assigned managed identity is this application\'s credential.'
    issuer: '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
    subject: identityPrincipalId
    audiences: [
      tokenExchangeAudience
    ]
  }
}

resource servicePrincipal 'Microsoft.Graph/servicePrincipals@v1.0' = {
  appId: app.appId
}

output appId string = app.appId
output objectId string = app.id
output servicePrincipalId string = servicePrincipal.id
output alertRoleId string = alertRoleId
