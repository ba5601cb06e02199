// The function app: Linux, custom handler (the `ticketpay` binary, started by the
// Functions host as host.json says), on Flex Consumption (FC1) by default or
// Elastic Premium (EP1). It runs as the user-assigned identity and reaches every
// dependency by that identity: no connection strings with keys.

param location string
param tags object
param planName string
param appName string

@allowed([
  'FlexConsumption'
  'ElasticPremium'
])
param hostingPlan string = 'FlexConsumption'

@description('Flex Consumption: most instances the app scales out to. Elastic Premium: most elastic workers.')
param maximumInstanceCount int = 40

@description('Flex Consumption instance memory size (MB).')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 512

@description('azd service name this app is deployed as (tag azd-service-name).')
param serviceName string

param identityId string
param identityClientId string
param storageAccountName string

@description('Container of the provider capacity leases.')
param leaseContainerName string
param deploymentContainerUrl string
param serviceBusFullyQualifiedNamespace string
param serviceBusEndpoint string
param cosmosEndpoint string
param cosmosDatabaseName string
param applicationInsightsConnectionString string
param keyVaultName string

// ticketpay's own settings (see local.settings.json.example for what each means).
param providersUrl string
param providersConfig string
param authorities string
param maxAttempts int
param retryBaseMs int
param retryCapMs int
param redactHeaders string
param redactFields string
param rustLog string

@description('Providers whose credential is a Key Vault secret `provider-key-<name>` (e.g. [\'gateway\']); each becomes TICKETPAY_PROVIDER_KEY_<NAME>.')
param providerKeyNames array = []

@description('Per-provider URL overrides, e.g. { gateway: \'https://pay.example\' }; each becomes TICKETPAY_PROVIDER_URL_<NAME>.')
param providerUrls object = {}

var isFlex = hostingPlan == 'FlexConsumption'

// Settings common to both plans. tests/infra.rs checks that every setting the
// binary reads (local.settings.json.example) is set here.
var appSettings = {
  // Functions host storage, by identity.
  AzureWebJobsStorage__accountName: storageAccountName
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  // Provider capacity leases: blobs in this container of the same account.
  TICKETPAY_LEASE_CONTAINER: leaseContainerName
  // Service Bus trigger connection (functions/*/function.json: connection ServiceBusConnection).
  ServiceBusConnection__fullyQualifiedNamespace: serviceBusFullyQualifiedNamespace
  ServiceBusConnection__credential: 'managedidentity'
  ServiceBusConnection__clientId: identityClientId
  // Store: Cosmos DB, by identity.
  CosmosDb__accountEndpoint: cosmosEndpoint
  CosmosDb__database: cosmosDatabaseName
  CosmosDb__credential: 'managedidentity'
  CosmosDb__clientId: identityClientId
  // The identity the handler's own Azure SDK and REST clients use.
  AZURE_CLIENT_ID: identityClientId
  // Telemetry, Entra ID authenticated ingestion.
  APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsightsConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'Authorization=AAD;ClientId=${identityClientId}'
  // ticketpay.
  TICKETPAY_BUS_URL: serviceBusEndpoint
  // Who may call the API (key hashes and roles): Key Vault secret `api-keys`, set by an operator.
  TICKETPAY_API_KEYS: '@Microsoft.KeyVault(VaultName=${keyVaultName};SecretName=api-keys)'
  TICKETPAY_PROVIDERS_URL: providersUrl
  TICKETPAY_PROVIDERS_CONFIG: providersConfig
  TICKETPAY_AUTHORITIES: authorities
  TICKETPAY_MAX_ATTEMPTS: string(maxAttempts)
  TICKETPAY_RETRY_BASE_MS: string(retryBaseMs)
  TICKETPAY_RETRY_CAP_MS: string(retryCapMs)
  TICKETPAY_SWEEP_OVERDUE_SECS: '60'
  TICKETPAY_SWEEP_MAX_RESENDS: '5'
  TICKETPAY_REDACT_HEADERS: redactHeaders
  TICKETPAY_REDACT_FIELDS: redactFields
  RUST_LOG: rustLog
}

// Elastic Premium only. Flex Consumption rejects these settings: its runtime is
// functionAppConfig.runtime (custom 1.0) and its package comes from blob storage.
// No Azure Files content share (it would need a storage key): the package is
// zip-deployed and run from package.
var elasticPremiumSettings = {
  FUNCTIONS_WORKER_RUNTIME: 'custom'
  FUNCTIONS_EXTENSION_VERSION: '~4'
  WEBSITE_RUN_FROM_PACKAGE: '1'
}

var commonAndPlanSettings = [
  for s in items(union(appSettings, isFlex ? {} : elasticPremiumSettings)): {
    name: s.key
    value: s.value
  }
]

// TICKETPAY_PROVIDER_KEY_<NAME>: Key Vault references, never values.
var providerKeySettings = [
  for n in providerKeyNames: {
    name: 'TICKETPAY_PROVIDER_KEY_${toUpper(n)}'
    value: '@Microsoft.KeyVault(VaultName=${keyVaultName};SecretName=provider-key-${toLower(n)})'
  }
]

// TICKETPAY_PROVIDER_URL_<NAME>: optional per-provider overrides of TICKETPAY_PROVIDERS_URL.
var providerUrlSettings = [
  for p in items(providerUrls): {
    name: 'TICKETPAY_PROVIDER_URL_${toUpper(p.key)}'
    value: p.value
  }
]

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225:Zone redundancy is off by default to keep the idle cost near zero; turn it on for production (see docs/deploy.md).
  name: planName
  location: location
  tags: tags
  kind: isFlex ? 'functionapp' : 'elastic'
  sku: isFlex ? {
    name: 'FC1'
    tier: 'FlexConsumption'
  } : {
    name: 'EP1'
    tier: 'ElasticPremium'
  }
  properties: {
    reserved: true // Linux
    maximumElasticWorkerCount: isFlex ? null : maximumInstanceCount
  }
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222:The api function is the public HTTPS entry point for operators and tools; restrict it with access restrictions or a front door per deployment.
  // checkov:skip=CKV_AZURE_212:Flex Consumption scales to zero by design; Elastic Premium keeps one warm instance (minimumElasticInstanceCount 1).
  // checkov:skip=CKV_AZURE_213:No health check path: Flex Consumption does not use one, and the Functions host itself restarts a handler that stops answering.
  // checkov:skip=CKV_AZURE_17:Client certificates are not used: the api function is called by operators and tools over HTTPS (authLevel and front door are configured per deployment).
  name: appName
  location: location
  tags: union(tags, {
    'azd-service-name': serviceName
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    // Key Vault references resolve with the user-assigned identity.
    keyVaultReferenceIdentity: identityId
    functionAppConfig: isFlex ? {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: deploymentContainerUrl
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'custom'
        version: '1.0'
      }
    } : null
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      functionAppScaleLimit: isFlex ? null : maximumInstanceCount
      minimumElasticInstanceCount: isFlex ? null : 1
      appSettings: concat(commonAndPlanSettings, providerUrlSettings, providerKeySettings)
    }
  }
}

// Deployments authenticate with Entra ID (azd, az); no basic-auth publishing credentials.
resource scmBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'scm'
  properties: {
    allow: false
  }
}

resource ftpBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'ftp'
  properties: {
    allow: false
  }
}

output name string = app.name
output url string = 'https://${app.properties.defaultHostName}'
