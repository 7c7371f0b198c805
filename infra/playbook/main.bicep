// Microsoft Sentinel playbook: when an incident is closed, post it to alertgate, which closes the
// incident's MDE alerts in one batchUpdate (POST /api/sentinel/incidents, README "The API").
//
// Deployed on its own into the resource group of the Sentinel (Log Analytics) workspace:
//   az deployment group create -g <workspace-rg> -f infra/playbook/main.bicep -p workspaceName=... ...
// It creates:
// - a Consumption Logic App with the Microsoft Sentinel incident trigger and one HTTP action that posts
//   the trigger body as is (alertgate reads the incident trigger's {"object": {"properties": ...}});
// - the Microsoft Sentinel API connection, authenticated with the Logic App's managed identity;
// - the automation rule that runs the playbook when an incident's status changes to Closed;
// - optionally the role assignments the playbook needs (see the parameters).
//
// The function key travels in the `code` query parameter, not in a header: alertgate copies it into the
// Location of a 202 (docs/contracts.md §1), so the HTTP action's asynchronous polling of GET /api/operations/{id}
// is authorized with the same key. That is also why the key must be a host key (default or a named one):
// a function-specific key of sentinel_incident does not open get_operation.

@description('Name of the Log Analytics workspace Microsoft Sentinel runs on (in this resource group).')
param workspaceName string

@description('Name of the playbook (Logic App).')
param playbookName string = 'alertgate-close-mde-alerts'

@description('Region of the playbook and its connection.')
param location string = resourceGroup().location

@description('alertgate\'s API base URL, the ALERTGATE_API_URL output of `azd up`, e.g. https://func-alertgate-abc123.azurewebsites.net/api.')
param alertgateApiUrl string

@description('A function (host) key of alertgate, when not read from Key Vault (keyVaultName empty). Stored as a secure workflow parameter: not shown by the portal, the API or run history.')
@secure()
param functionKey string = ''

@description('Key Vault that holds the function key; the playbook reads it at every run with its managed identity (rotate the key without redeploying). Empty to use functionKey. The vault must use Azure RBAC.')
param keyVaultName string = ''

@description('Resource group of keyVaultName.')
param keyVaultResourceGroup string = resourceGroup().name

@description('Name of the Key Vault secret that holds the function key.')
param functionKeySecretName string = 'alertgate-function-key'

@description('Grant the playbook\'s identity Key Vault Secrets User on the vault (needs Owner or User Access Administrator there). False if someone else grants it.')
param grantKeyVaultAccess bool = true

@description('When alertgate requires Entra ID tokens (enableEntraAuth): the audience to request, e.g. api://<app registration client id>. The playbook then also sends a token of its managed identity; add that identity\'s application id to alertgate\'s allowed client applications.')
param alertgateAudience string = ''

@description('Retries of the HTTP action on 408, 429 and 5xx, with exponential back-off. Re-sending is safe: alertgate derives the idempotency key from the incident id and its last-modified time.')
@minValue(0)
@maxValue(90)
param retryCount int = 4

@description('First retry interval (ISO 8601 duration).')
param retryInterval string = 'PT20S'

@description('How long the HTTP action may poll an accepted (202) request before it times out (ISO 8601 duration). Deferred chunks wait for MDE\'s hourly budget, so allow hours.')
param asyncTimeout string = 'PT12H'

@description('Create the automation rule that runs the playbook when an incident is closed.')
param createAutomationRule bool = true

@description('Order of the automation rule among the workspace\'s rules (1-1000).')
@minValue(1)
@maxValue(1000)
param automationRuleOrder int = 900

@description('Object id of the "Azure Security Insights" service principal in this tenant (`az ad sp show --id 98785600-1bb7-4fb9-b9fa-19afe2c8a360 --query id -o tsv`): when given, it gets Microsoft Sentinel Automation Contributor on this resource group, which automation rules need to run playbooks. Empty if already granted.')
param sentinelAutomationPrincipalId string = ''

@description('Add alertgate\'s answer (status, operation id) as a comment to the incident; gives the playbook\'s identity Microsoft Sentinel Responder on the workspace. Useful because the HTTP action\'s inputs and outputs are hidden in run history (they carry the key).')
param addIncidentComment bool = false

var useKeyVault = !empty(keyVaultName)
var useEntraToken = !empty(alertgateAudience)
var connectionName = 'azuresentinel-${playbookName}'
// Automation rule names are GUIDs; this one is stable, so a redeploy updates the rule in place.
var automationRuleName = guid(workspace.id, playbookName, 'alertgate-incident-closed')
var roles = {
  sentinelAutomationContributor: 'f4c81013-99ee-4d62-a7ee-b3f1f648599a'
  sentinelResponder: '3e150937-b8fe-4cfb-8069-0eaf05ecd056'
}

// --- The workflow definition ---------------------------------------------------------------------------------

// Key Vault's resource id for tokens in this cloud (https://vault.azure.net in Azure commercial).
var keyVaultAudience = 'https://${substring(environment().suffixes.keyvaultDns, 1)}'
var keyExpression = useKeyVault ? 'body(\'Get_function_key\')?[\'value\']' : 'parameters(\'alertgateFunctionKey\')'

// Both actions carry the key (in the URL, and in the Location alertgate answers with), so run history
// hides their inputs and outputs.
var secureInputsAndOutputs = {
  secureData: {
    properties: [
      'inputs'
      'outputs'
    ]
  }
}

var getKeyAction = {
  Get_function_key: {
    type: 'Http'
    runAfter: {}
    inputs: {
      method: 'GET'
      uri: 'https://${keyVaultName}${environment().suffixes.keyvaultDns}/secrets/${functionKeySecretName}?api-version=7.4'
      authentication: {
        type: 'ManagedServiceIdentity'
        audience: keyVaultAudience
      }
    }
    runtimeConfiguration: secureInputsAndOutputs
  }
}

var postInputs = {
  method: 'POST'
  uri: '@{parameters(\'alertgateApiUrl\')}/sentinel/incidents?code=@{encodeUriComponent(${keyExpression})}'
  headers: {
    'Content-Type': 'application/json'
  }
  // The incident trigger's body as is: alertgate takes {"object": {"properties": ...}}.
  body: '@triggerBody()'
}
var postAuthentication = useEntraToken ? {
  authentication: {
    type: 'ManagedServiceIdentity'
    audience: alertgateAudience
  }
} : {}

var postAction = {
  Post_incident_to_alertgate: {
    type: 'Http'
    runAfter: useKeyVault ? {
      Get_function_key: [
        'Succeeded'
      ]
    } : {}
    inputs: union(postInputs, postAuthentication)
    // The asynchronous pattern is on (the HTTP action's default; never set DisableAsyncPattern): on a
    // 202 the action polls the Location after each Retry-After until alertgate answers 200 (all MDE
    // alerts updated) or a failure status, which fails the run visibly.
    retryPolicy: {
      type: 'exponential'
      count: retryCount
      interval: retryInterval
      minimumInterval: 'PT5S'
      maximumInterval: 'PT1H'
    }
    limit: {
      timeout: asyncTimeout
    }
    runtimeConfiguration: secureInputsAndOutputs
  }
}

var commentActions = {
  Add_alertgate_answer_to_incident: {
    type: 'ApiConnection'
    runAfter: {
      Post_incident_to_alertgate: [
        'Succeeded'
        'Failed'
        'TimedOut'
      ]
    }
    inputs: {
      host: {
        connection: {
          name: '@parameters(\'$connections\')[\'azuresentinel\'][\'connectionId\']'
        }
      }
      method: 'post'
      path: '/Incidents/Comment'
      body: {
        incidentArmId: '@triggerBody()?[\'object\']?[\'id\']'
        message: '<p>alertgate answered @{outputs(\'Post_incident_to_alertgate\')?[\'statusCode\']}: @{coalesce(body(\'Post_incident_to_alertgate\')?[\'status\'], body(\'Post_incident_to_alertgate\')?[\'title\'], \'no body\')}; operation @{coalesce(body(\'Post_incident_to_alertgate\')?[\'operationId\'], \'none\')}. @{coalesce(body(\'Post_incident_to_alertgate\')?[\'detail\'], \'\')}</p>'
      }
    }
  }
  // The comment runs after a failed post too; this keeps the run Failed in that case.
  Fail_when_alertgate_failed: {
    type: 'If'
    runAfter: {
      Add_alertgate_answer_to_incident: [
        'Succeeded'
        'Failed'
      ]
    }
    expression: {
      and: [
        {
          not: {
            equals: [
              '@actions(\'Post_incident_to_alertgate\')?[\'status\']'
              'Succeeded'
            ]
          }
        }
      ]
    }
    actions: {
      Terminate_failed: {
        type: 'Terminate'
        runAfter: {}
        inputs: {
          runStatus: 'Failed'
          runError: {
            code: 'AlertgateFailed'
            message: 'alertgate did not update the incident\'s MDE alerts; see the incident comment or GET /api/operations/{operationId}.'
          }
        }
      }
    }
  }
}

var actions = union(useKeyVault ? getKeyAction : {}, postAction, addIncidentComment ? commentActions : {})

var keyParameterDefinition = useKeyVault ? {} : {
  alertgateFunctionKey: {
    type: 'SecureString'
    defaultValue: ''
  }
}
var keyParameterValue = useKeyVault ? {} : {
  alertgateFunctionKey: {
    value: functionKey
  }
}

var baseParameterDefinitions = {
  '$connections': {
    type: 'Object'
    defaultValue: {}
  }
  alertgateApiUrl: {
    type: 'String'
    defaultValue: ''
  }
}
var baseParameterValues = {
  '$connections': {
    value: {
      azuresentinel: {
        connectionId: sentinelConnection.id
        connectionName: sentinelConnection.name
        id: sentinelConnection.properties.api.id
        connectionProperties: {
          authentication: {
            type: 'ManagedServiceIdentity'
          }
        }
      }
    }
  }
  alertgateApiUrl: {
    value: alertgateApiUrl
  }
}

// --- Resources -----------------------------------------------------------------------------------------------

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' existing = {
  name: workspaceName
}

resource sentinelConnection 'Microsoft.Web/connections@2016-06-01' = {
  name: connectionName
  location: location
  properties: {
    displayName: connectionName
    // 'Alternative' = the connection authenticates as the Logic App's managed identity: no user
    // consent, no stored credential.
    parameterValueType: 'Alternative'
    api: {
      id: subscriptionResourceId('Microsoft.Web/locations/managedApis', location, 'azuresentinel')
    }
  }
}

resource playbook 'Microsoft.Logic/workflows@2019-05-01' = {
  name: playbookName
  location: location
  tags: {
    application: 'alertgate'
  }
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    state: 'Enabled'
    definition: {
      '$schema': 'https://schema.management.azure.com/providers/Microsoft.Logic/schemas/2016-06-01/workflowdefinition.json#'
      contentVersion: '1.0.0.0'
      parameters: union(baseParameterDefinitions, keyParameterDefinition)
      triggers: {
        Microsoft_Sentinel_incident: {
          type: 'ApiConnectionWebhook'
          inputs: {
            body: {
              callback_url: '@{listCallbackUrl()}'
            }
            host: {
              connection: {
                name: '@parameters(\'$connections\')[\'azuresentinel\'][\'connectionId\']'
              }
            }
            path: '/incident-creation'
          }
        }
      }
      actions: actions
      outputs: {}
    }
    parameters: union(baseParameterValues, keyParameterValue)
  }
}

// Automation rules run playbooks as the "Azure Security Insights" service principal, which needs
// Microsoft Sentinel Automation Contributor on the playbook's resource group; Sentinel refuses to create
// a rule whose playbook it cannot run.
resource automationPermission 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(sentinelAutomationPrincipalId)) {
  name: guid(resourceGroup().id, sentinelAutomationPrincipalId, roles.sentinelAutomationContributor)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.sentinelAutomationContributor)
    principalId: sentinelAutomationPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Only for the incident comment: posting the incident needs no Sentinel role.
resource responderRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (addIncidentComment) {
  name: guid(workspace.id, playbook.id, roles.sentinelResponder)
  scope: workspace
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.sentinelResponder)
    principalId: playbook.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

module keyVaultAccess 'keyvault-access.bicep' = if (useKeyVault && grantKeyVaultAccess) {
  name: 'alertgate-playbook-keyvault-access'
  scope: resourceGroup(keyVaultResourceGroup)
  params: {
    keyVaultName: keyVaultName
    secretName: functionKeySecretName
    principalId: playbook.identity.principalId
  }
}

resource closedIncidentRule 'Microsoft.SecurityInsights/automationRules@2023-02-01' = if (createAutomationRule) {
  name: automationRuleName
  scope: workspace
  dependsOn: [
    automationPermission
  ]
  properties: {
    displayName: 'alertgate: close the MDE alerts of a closed incident'
    order: automationRuleOrder
    triggeringLogic: {
      isEnabled: true
      triggersOn: 'Incidents'
      triggersWhen: 'Updated'
      conditions: [
        {
          conditionType: 'PropertyChanged'
          conditionProperties: {
            propertyName: 'IncidentStatus'
            changeType: 'ChangedTo'
            operator: 'Equals'
            propertyValues: [
              'Closed'
            ]
          }
        }
      ]
    }
    actions: [
      {
        order: 1
        actionType: 'RunPlaybook'
        actionConfiguration: {
          logicAppResourceId: playbook.id
          tenantId: subscription().tenantId
        }
      }
    ]
  }
}

output playbookName string = playbook.name
output playbookResourceId string = playbook.id
@description('Object id of the playbook\'s managed identity; its application id (for alertgate\'s allowed client applications) is `az ad sp show --id <this> --query appId -o tsv`.')
output playbookPrincipalId string = playbook.identity.principalId
output automationRuleName string = createAutomationRule ? automationRuleName : ''
