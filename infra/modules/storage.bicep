// Storage account for the Functions runtime (AzureWebJobsStorage: leases,
// timers, host keys) and the blob container Flex Consumption deploys the
// package from. Reached by managed identity only: shared keys are off.

param location string
param tags object
param name string

@description('Blob container the deployment package is uploaded to (Flex Consumption).')
param deploymentContainerName string

@description('Principal id of the function app\'s managed identity.')
param principalId string

// Built-in roles the Functions host needs on its storage, by identity.
var roles = [
  'b7e6dc6d-f1e8-4753-8033-0f276bb0955b' // Storage Blob Data Owner
  '974c5e8b-45b9-4653-ba55-5f855dd0fb88' // Storage Queue Data Contributor
  '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3' // Storage Table Data Contributor
]

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35:Flex Consumption without a VNet reaches its storage over the public endpoint, so the firewall cannot default to deny; shared keys are disabled.
  // checkov:skip=CKV_AZURE_59:Flex Consumption without a VNet reaches its storage over the public endpoint; shared keys are disabled, so access needs an Entra token.
  // checkov:skip=CKV_AZURE_206:Locally redundant storage is enough for runtime state and deployment packages, which are recreated by a deployment.
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

// Zero-byte blobs whose leases share each provider's capacity among the
// instances (the identity's Storage Blob Data Owner role covers them).
resource leaseContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: 'ticketpay-leases'
  properties: {
    publicAccess: 'None'
  }
}

resource dataRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for roleId in roles: {
    name: guid(account.id, principalId, roleId)
    scope: account
    properties: {
      principalId: principalId
      principalType: 'ServicePrincipal'
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)
    }
  }
]

output name string = account.name
output leaseContainerName string = leaseContainer.name
output blobEndpoint string = account.properties.primaryEndpoints.blob
output deploymentContainerUrl string = '${account.properties.primaryEndpoints.blob}${deploymentContainer.name}'
