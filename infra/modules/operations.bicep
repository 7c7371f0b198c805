// The operator's view of alertgate: a workbook over the telemetry alertgate emits (docs/telemetry.md) and
// the log alert rules that call someone when it goes wrong, both on the Application Insights component of
// modules/monitoring.bicep (its classic tables customMetrics and customEvents).
//
// tests/infra reads this file as text (Bicep cannot be compiled there), so two conventions hold:
// - the workbook's content is infra/workbook/alertgate.workbook.json, loaded whole with loadTextContent
//   (tests/infra/test_workbook.py validates it against Microsoft's published workbook schema);
// - every alert rule's KQL is a Bicep multi-line string ('''...''': no interpolation, no escapes, the text
//   is the query as Azure Monitor runs it) assigned to a `var` whose name ends in `Query`, and each
//   rule's `query:` is one of those variables. tests/infra/test_kql.py parses every such query with
//   Microsoft's Kusto language service against the two tables, and fails if it finds none.
//
// The rules are created with or without an action group (actionGroupId empty): without one they still
// fire and show in Azure Monitor > Alerts, and an action group can be given later by a redeploy.

@description('Name of the Application Insights component (modules/monitoring.bicep) the workbook reads and the rules query.')
param applicationInsightsName string

@description('Region of the workbook and the alert rules.')
param location string

@description('Tags for the workbook and the alert rules.')
param tags object = {}

@description('Prefix of the alert rules\' names: <prefix>-mde-forbidden, <prefix>-poison-messages, ...')
@minLength(1)
@maxLength(200)
param alertRuleNamePrefix string

@description('Resource id of an existing action group the alert rules notify; empty creates the rules without actions (they still fire and show in Azure Monitor > Alerts).')
param actionGroupId string = ''

@description('The oldest-pending rule fires when the oldest chunk accepted and not yet ended (alertgate.backlog.oldest_age) is older than this many minutes.')
@minValue(1)
@maxValue(1440)
param oldestPendingAlertMinutes int = 15

@description('Name of the workbook in the portal (Application Insights > Workbooks, and Azure Monitor > Workbooks).')
@minLength(1)
param workbookDisplayName string = 'alertgate operations'

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

// --- The workbook --------------------------------------------------------------------------------------

// The workbook opens on the component wherever it is opened from (fallbackResourceIds), so its queries
// always read alertgate's tables.
var workbookContent = union(json(loadTextContent('../workbook/alertgate.workbook.json')), {
  fallbackResourceIds: [
    applicationInsights.id
  ]
})

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  // A fixed name per component: a redeploy updates the same workbook instead of adding another.
  name: guid(applicationInsights.id, 'alertgate-operations-workbook')
  location: location
  tags: union(tags, {
    'hidden-title': workbookDisplayName
  })
  kind: 'shared'
  properties: {
    displayName: workbookDisplayName
    description: 'alertgate\'s MDE call budget, backlog and queues, outcomes, 429s and 403s, and MDE error codes (docs/telemetry.md).'
    category: 'workbook'
    // Lower case, as the portal writes it: the component's Workbooks gallery lists workbooks by sourceId.
    sourceId: toLower(applicationInsights.id)
    version: 'Notebook/1.0'
    serializedData: string(workbookContent)
  }
}

// --- The alert rules' queries ------------------------------------------------------------------------------
// Each returns one row per exported data point, with `timestamp`, the dimensions the alert is split by and
// one measure column; the rule aggregates the measure over each window (Total for counters, whose
// valueSum is the increase in that minute; Maximum for gauges, whose value is the last in that minute).

// Any call MDE answered 403: the identity or the multi-tenant application lacks Alert.ReadWrite.All in
// that tenant, or the customer revoked consent.
var mdeForbiddenQuery = '''
customMetrics
| where name == "alertgate.mde.forbidden"
| extend tenant = tostring(customDimensions.tenant), channel = tostring(customDimensions.channel)
| project timestamp, tenant, channel, ForbiddenCalls = valueSum
'''

// Messages that reached a poison queue and were handled there (a counter; queue: chunks or requests), and
// messages sitting in a poison queue (a gauge; queue: its full name, such as alert-update-chunks-poison):
// either above 0 in a window fires the rule.
var poisonMessagesQuery = '''
let handled = customMetrics
| where name == "alertgate.poison.messages"
| project timestamp, queue = tostring(customDimensions.queue), PoisonMessages = valueSum;
let waiting = customMetrics
| where name == "alertgate.queue.depth"
| extend queue = tostring(customDimensions.queue)
| where queue endswith "-poison"
| project timestamp, queue, PoisonMessages = value;
union handled, waiting
'''

// The age in seconds of the oldest chunk accepted and not yet ended, per tenant (threshold: a parameter).
var oldestPendingQuery = '''
customMetrics
| where name == "alertgate.backlog.oldest_age"
| project timestamp, tenant = tostring(customDimensions.tenant), OldestAgeSeconds = value
'''

// Chunks that ended OutcomeUnknown: sent with a comment, no answer, not re-sent; they may or may not
// have been applied in MDE and need a person to look.
var outcomeUnknownQuery = '''
customMetrics
| where name == "alertgate.chunks.ended"
| where tostring(customDimensions.result) == "OutcomeUnknown"
| extend tenant = tostring(customDimensions.tenant), channel = tostring(customDimensions.channel)
| project timestamp, tenant, channel, OutcomeUnknownChunks = valueSum
'''

// Calls MDE answered 429. One window with a 429 is normal when another application shares the budget;
// three in a row means alertgate's limits are above what MDE gives it.
var mdeTooManyRequestsQuery = '''
customMetrics
| where name == "alertgate.mde.calls"
| where tostring(customDimensions.outcome) == "429"
| extend tenant = tostring(customDimensions.tenant), channel = tostring(customDimensions.channel)
| project timestamp, tenant, channel, TooManyRequests = valueSum
'''

// --- The alert rules ---------------------------------------------------------------------------------------

var actionGroups = empty(actionGroupId) ? [] : [
  actionGroupId
]

// Split by every value of a dimension (one alert per tenant, channel, ...).
var byTenant = {
  name: 'tenant'
  operator: 'Include'
  values: [
    '*'
  ]
}
var byChannel = {
  name: 'channel'
  operator: 'Include'
  values: [
    '*'
  ]
}
var byQueue = {
  name: 'queue'
  operator: 'Include'
  values: [
    '*'
  ]
}

var rules = [
  {
    name: 'mde-forbidden'
    displayName: 'alertgate: MDE answered 403 Forbidden'
    description: 'MDE refused alertgate\'s identity (403) in a tenant: grant Alert.ReadWrite.All (infra/grant-defender-permission.sh, or the customer\'s consent for a customer tenant). Metric alertgate.mde.forbidden.'
    severity: 1
    query: mdeForbiddenQuery
    timeAggregation: 'Total'
    metricMeasureColumn: 'ForbiddenCalls'
    threshold: 0
    dimensions: [
      byTenant
      byChannel
    ]
    periods: 1
  }
  {
    name: 'poison-messages'
    displayName: 'alertgate: messages in a poison queue'
    description: 'A message reached a poison queue (alertgate.poison.messages) or a poison queue holds messages (alertgate.queue.depth): a request or chunk failed every delivery host.json allows (maxDequeueCount); its operation ended Failed.'
    severity: 2
    query: poisonMessagesQuery
    timeAggregation: 'Total'
    metricMeasureColumn: 'PoisonMessages'
    threshold: 0
    dimensions: [
      byQueue
    ]
    periods: 1
  }
  {
    name: 'oldest-pending'
    displayName: 'alertgate: oldest pending update older than ${oldestPendingAlertMinutes} minutes'
    description: 'The oldest chunk accepted and not yet ended (alertgate.backlog.oldest_age) is older than ${oldestPendingAlertMinutes} minutes: the budget, 429s or an earlier update of the same alert hold it back.'
    severity: 2
    query: oldestPendingQuery
    timeAggregation: 'Maximum'
    metricMeasureColumn: 'OldestAgeSeconds'
    threshold: oldestPendingAlertMinutes * 60
    dimensions: [
      byTenant
    ]
    periods: 1
  }
  {
    name: 'outcome-unknown'
    displayName: 'alertgate: a chunk ended OutcomeUnknown'
    description: 'A chunk with a comment was sent but no answer came, and it is not re-sent (alertgate.chunks.ended, result OutcomeUnknown): check the alerts of its operation in MDE.'
    severity: 2
    query: outcomeUnknownQuery
    timeAggregation: 'Total'
    metricMeasureColumn: 'OutcomeUnknownChunks'
    threshold: 0
    dimensions: [
      byTenant
      byChannel
    ]
    periods: 1
  }
  {
    name: 'mde-429'
    displayName: 'alertgate: MDE answered 429 in 3 consecutive checks'
    description: 'MDE answered 429 Too Many Requests in each of the last three 5-minute windows (alertgate.mde.calls, outcome 429): another application spends the same budget, or DEFENDER_RATE_LIMITS is above what MDE allows.'
    severity: 3
    query: mdeTooManyRequestsQuery
    timeAggregation: 'Total'
    metricMeasureColumn: 'TooManyRequests'
    threshold: 0
    dimensions: [
      byTenant
      byChannel
    ]
    periods: 3
  }
]

resource alertRules 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = [
  for rule in rules: {
    name: '${alertRuleNamePrefix}-${rule.name}'
    location: location
    tags: tags
    kind: 'LogAlert'
    properties: {
      displayName: rule.displayName
      description: rule.description
      severity: rule.severity
      enabled: true
      scopes: [
        applicationInsights.id
      ]
      evaluationFrequency: 'PT5M'
      windowSize: 'PT5M'
      criteria: {
        allOf: [
          {
            query: rule.query
            timeAggregation: rule.timeAggregation
            metricMeasureColumn: rule.metricMeasureColumn
            operator: 'GreaterThan'
            threshold: rule.threshold
            dimensions: rule.dimensions
            // periods consecutive windows must all breach (the 429 rule: 3 of 3).
            failingPeriods: {
              numberOfEvaluationPeriods: rule.periods
              minFailingPeriodsToAlert: rule.periods
            }
          }
        ]
      }
      // Resolved by itself once a window no longer breaches.
      autoMitigate: true
      actions: {
        actionGroups: actionGroups
      }
    }
  }
]

output workbookId string = workbook.id
output workbookName string = workbook.name
output alertRuleNames array = [for rule in rules: '${alertRuleNamePrefix}-${rule.name}']
