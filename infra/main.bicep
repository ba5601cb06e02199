// ticketpay on Azure: one resource group with the function app (Rust custom
// handler), its Service Bus queues, Cosmos DB store, storage, Key Vault,
// monitoring and Managed Grafana. Deployed by `azd up` (see docs/deploy.md).
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('azd environment name; names the resource group and seeds resource names.')
param environmentName string

@minLength(1)
@description('Azure region for every resource.')
param location string

@description('Object id of the deployer (azd sets AZURE_PRINCIPAL_ID): Grafana Admin and Key Vault Secrets Officer. Empty: no role for a person.')
param principalId string = ''

@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
@description('Type of principalId (ServicePrincipal when a pipeline deploys).')
param principalType string = 'User'

@allowed([
  'FlexConsumption'
  'ElasticPremium'
])
@description('Function hosting: Flex Consumption (FC1, scale to zero) or Elastic Premium (EP1, always one warm instance).')
param hostingPlan string = 'FlexConsumption'

@description('Most instances the function app scales out to.')
param maximumInstanceCount int = 40

@allowed([
  512
  2048
  4096
])
@description('Flex Consumption instance memory size (MB).')
param instanceMemoryMB int = 512

@allowed([
  'serverless'
  'autoscale'
])
@description('Cosmos DB throughput: serverless (default) or provisioned autoscale per container.')
param cosmosThroughputMode string = 'serverless'

@minValue(1000)
@description('Autoscale maximum RU/s of the records container when cosmosThroughputMode is autoscale: 20,000 carries one batch at the providers\' pace (docs/scale.md).')
param cosmosAutoscaleMaxThroughput int = 20000

@minLength(1)
@description('Base URL under which every provider is reached as /{provider} (TICKETPAY_PROVIDERS_URL).')
param providersUrl string

@description('Per-provider URL overrides, e.g. { gateway: \'https://pay.example\' } (TICKETPAY_PROVIDER_URL_<NAME>).')
param providerUrls object = {}

@description('Providers with a credential in Key Vault secret `provider-key-<name>`, e.g. [\'gateway\', \'settlement\'] (TICKETPAY_PROVIDER_KEY_<NAME>).')
param providerKeyNames array = []

@description('The providers\' contract: realistic, zero-latency, faulty, or a TOML file in the package (TICKETPAY_PROVIDERS_CONFIG).')
param providersConfig string = 'realistic'

@description('Comma-separated authority codes (TICKETPAY_AUTHORITIES).')
param authorities string = 'CITY-PARKING,STATE-TOLLS,METRO-TRANSIT,HIGHWAY-PATROL,WATER-UTILITY'

@minValue(1)
param maxAttempts int = 8
param retryBaseMs int = 500
param retryCapMs int = 60000

@description('Extra header names redacted in the audit trail (comma-separated).')
param redactHeaders string = ''

@description('Extra JSON field names redacted in the audit trail (comma-separated).')
param redactFields string = ''

param rustLog string = 'warn,ticketpay=info'

// One queue per queue-triggered function, with the settings its trigger declares
// in functions/<function>/function.json (queueName, isSessionsEnabled,
// queueSettings). tests/infra.rs fails when the two differ.
var queues = [
  {
    function: 'lookup'
    name: 'ticket-lookup'
    lockDuration: 'PT1M'
    maxDeliveryCount: 10
    duplicateDetectionHistoryTimeWindow: 'PT10M'
    requiresSession: false
    deadLetteringOnMessageExpiration: true
  }
  {
    function: 'validate'
    name: 'ticket-validate'
    lockDuration: 'PT1M'
    maxDeliveryCount: 10
    duplicateDetectionHistoryTimeWindow: 'PT10M'
    requiresSession: false
    deadLetteringOnMessageExpiration: true
  }
  {
    // Sessions: one batch's reservations are taken one at a time (session = batch).
    function: 'reserve'
    name: 'ticket-reserve'
    lockDuration: 'PT1M'
    maxDeliveryCount: 10
    duplicateDetectionHistoryTimeWindow: 'PT10M'
    requiresSession: true
    deadLetteringOnMessageExpiration: true
  }
  {
    function: 'pay'
    name: 'ticket-pay'
    lockDuration: 'PT1M'
    maxDeliveryCount: 10
    duplicateDetectionHistoryTimeWindow: 'PT10M'
    requiresSession: false
    deadLetteringOnMessageExpiration: true
  }
  {
    function: 'notify'
    name: 'ticket-notify'
    lockDuration: 'PT1M'
    maxDeliveryCount: 10
    duplicateDetectionHistoryTimeWindow: 'PT10M'
    requiresSession: false
    deadLetteringOnMessageExpiration: true
  }
]

var tags = {
  'azd-env-name': environmentName
  app: 'ticketpay'
}

var token = toLower(uniqueString(subscription().id, environmentName, location))
var functionAppName = 'func-ticketpay-${token}'

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

module identity 'modules/identity.bicep' = {
  scope: rg
  name: 'identity'
  params: {
    location: location
    tags: tags
    name: 'id-ticketpay-${token}'
  }
}

module monitoring 'modules/monitoring.bicep' = {
  scope: rg
  name: 'monitoring'
  params: {
    location: location
    tags: tags
    logAnalyticsName: 'log-ticketpay-${token}'
    applicationInsightsName: 'appi-ticketpay-${token}'
    publisherPrincipalId: identity.outputs.principalId
  }
}

module serviceBus 'modules/servicebus.bicep' = {
  scope: rg
  name: 'servicebus'
  params: {
    location: location
    tags: tags
    name: 'sb-ticketpay-${token}'
    queues: queues
    principalId: identity.outputs.principalId
  }
}

module cosmos 'modules/cosmos.bicep' = {
  scope: rg
  name: 'cosmos'
  params: {
    location: location
    tags: tags
    accountName: 'cosmos-ticketpay-${token}'
    throughputMode: cosmosThroughputMode
    autoscaleMaxThroughput: cosmosAutoscaleMaxThroughput
    principalId: identity.outputs.principalId
  }
}

module storage 'modules/storage.bicep' = {
  scope: rg
  name: 'storage'
  params: {
    location: location
    tags: tags
    name: 'st${token}'
    deploymentContainerName: 'deployment-package'
    principalId: identity.outputs.principalId
  }
}

module keyVault 'modules/keyvault.bicep' = {
  scope: rg
  name: 'keyvault'
  params: {
    location: location
    tags: tags
    name: 'kv-${token}'
    principalId: identity.outputs.principalId
    operatorPrincipalId: principalId
    operatorPrincipalType: principalType
  }
}

module functionApp 'modules/functionapp.bicep' = {
  scope: rg
  name: 'functionapp'
  params: {
    location: location
    tags: tags
    planName: 'plan-ticketpay-${token}'
    appName: functionAppName
    hostingPlan: hostingPlan
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    serviceName: 'ticketpay'
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    leaseContainerName: storage.outputs.leaseContainerName
    deploymentContainerUrl: storage.outputs.deploymentContainerUrl
    serviceBusFullyQualifiedNamespace: serviceBus.outputs.fullyQualifiedNamespace
    serviceBusEndpoint: serviceBus.outputs.endpoint
    cosmosEndpoint: cosmos.outputs.endpoint
    cosmosDatabaseName: cosmos.outputs.databaseName
    applicationInsightsConnectionString: monitoring.outputs.connectionString
    keyVaultName: keyVault.outputs.name
    providersUrl: providersUrl
    providerUrls: providerUrls
    providerKeyNames: providerKeyNames
    providersConfig: providersConfig
    authorities: authorities
    maxAttempts: maxAttempts
    retryBaseMs: retryBaseMs
    retryCapMs: retryCapMs
    redactHeaders: redactHeaders
    redactFields: redactFields
    rustLog: rustLog
  }
}

module grafana 'modules/grafana.bicep' = {
  scope: rg
  name: 'grafana'
  params: {
    location: location
    tags: tags
    name: 'amg-${token}'
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    adminPrincipalId: principalId
    adminPrincipalType: principalType
  }
}

// azd stores these in the environment (.azure/<env>/.env); hooks and operators use them.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_APP_URL string = functionApp.outputs.url
output AZURE_SERVICEBUS_NAMESPACE string = serviceBus.outputs.name
output AZURE_SERVICEBUS_FQDN string = serviceBus.outputs.fullyQualifiedNamespace
output AZURE_COSMOS_ENDPOINT string = cosmos.outputs.endpoint
output AZURE_COSMOS_DATABASE string = cosmos.outputs.databaseName
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.applicationInsightsName
output APPLICATIONINSIGHTS_CONNECTION_STRING string = monitoring.outputs.connectionString
output AZURE_GRAFANA_NAME string = grafana.outputs.name
output AZURE_GRAFANA_ENDPOINT string = grafana.outputs.endpoint
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_CLIENT_ID string = identity.outputs.clientId
