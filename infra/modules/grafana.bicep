// Azure Managed Grafana over Application Insights. Its system-assigned identity
// gets Monitoring Reader on the Application Insights resource only (the Azure
// Monitor data source queries traces in that resource's context); the deployer
// gets Grafana Admin so the postprovision hook can import infra/grafana/*.json.

param location string
param tags object
param name string
param applicationInsightsName string

@description('Principal id granted Grafana Admin (normally the deployer). Empty: none.')
param adminPrincipalId string = ''

@description('Principal type of adminPrincipalId.')
param adminPrincipalType string = 'User'

var monitoringReaderRoleId = '43d0d8ad-25c7-4714-9337-8ba259a9fe05' // Monitoring Reader
var grafanaAdminRoleId = '22926164-76b3-42b3-bc55-97df8dab3e41' // Grafana Admin

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource grafana 'Microsoft.Dashboard/grafana@2024-10-01' = {
  name: name
  location: location
  tags: tags
  sku: {
    name: 'Standard'
  }
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    apiKey: 'Disabled'
    publicNetworkAccess: 'Enabled'
    zoneRedundancy: 'Disabled'
    grafanaMajorVersion: '11'
  }
}

resource monitoringReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, grafana.id, monitoringReaderRoleId)
  scope: appInsights
  properties: {
    principalId: grafana.identity.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringReaderRoleId)
  }
}

resource grafanaAdmin 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(adminPrincipalId)) {
  name: guid(grafana.id, adminPrincipalId, grafanaAdminRoleId)
  scope: grafana
  properties: {
    principalId: adminPrincipalId
    principalType: adminPrincipalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', grafanaAdminRoleId)
  }
}

output name string = grafana.name
output endpoint string = grafana.properties.endpoint
