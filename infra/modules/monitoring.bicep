// Log Analytics workspace and workspace-based Application Insights.
// Ingestion accepts Entra ID (AAD) tokens only: the function app authenticates
// with its managed identity (APPLICATIONINSIGHTS_AUTHENTICATION_STRING) and needs
// Monitoring Metrics Publisher on this component, which is granted here.

param location string
param tags object
param logAnalyticsName string
param applicationInsightsName string

@description('Principal id of the managed identity that sends telemetry.')
param publisherPrincipalId string

@description('Days of log retention in the workspace.')
param retentionInDays int = 30

// Monitoring Metrics Publisher (built-in role).
var monitoringMetricsPublisherRoleId = '3913510d-42f4-4e42-8a64-420c390055eb'

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
    features: {
      // Grafana reads traces through the Application Insights resource, with
      // permissions on that resource alone (resource-context access).
      enableLogAccessUsingOnlyResourcePermissions: true
    }
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: applicationInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    IngestionMode: 'LogAnalytics'
    // No instrumentation-key ingestion: Entra ID only.
    DisableLocalAuth: true
    publicNetworkAccessForIngestion: 'Enabled'
    publicNetworkAccessForQuery: 'Enabled'
  }
}

resource publisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, publisherPrincipalId, monitoringMetricsPublisherRoleId)
  scope: appInsights
  properties: {
    principalId: publisherPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisherRoleId)
  }
}

output workspaceId string = workspace.id
output applicationInsightsId string = appInsights.id
output applicationInsightsName string = appInsights.name
output connectionString string = appInsights.properties.ConnectionString
