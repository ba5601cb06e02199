// Key Vault (RBAC mode) for provider credentials and the API keys. Bicep
// creates no secrets and holds no secret values: an operator sets `api-keys`
// and the `provider-key-<name>` secrets (see docs/deploy.md) and the function
// app reads them through Key Vault references (TICKETPAY_API_KEYS,
// TICKETPAY_PROVIDER_KEY_<NAME>), resolved with its managed identity.

param location string
param tags object
param name string

@description('Principal id of the function app\'s managed identity (Key Vault Secrets User).')
param principalId string

@description('Optional principal id of the operator who sets provider secrets (Key Vault Secrets Officer). Empty: none.')
param operatorPrincipalId string = ''

@description('Principal type of operatorPrincipalId.')
param operatorPrincipalType string = 'User'

var secretsUserRoleId = '4633458b-17de-408a-b874-0445c86b69e6' // Key Vault Secrets User
var secretsOfficerRoleId = 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7' // Key Vault Secrets Officer

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_189:Public network access is needed: without a VNet, Flex Consumption resolves Key Vault references over the public endpoint; RBAC mode, Entra tokens only.
  // checkov:skip=CKV_AZURE_110:Purge protection is irreversible and would block `azd down --purge` (see below).
  // checkov:skip=CKV_AZURE_42:Purge protection is irreversible and would block `azd down --purge`; the vault holds only provider keys and API key hashes that operators can set again, and soft delete stays on.
  // checkov:skip=CKV_AZURE_109:Flex Consumption without a VNet resolves Key Vault references over the public endpoint; every read needs an Entra token and an RBAC role.
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 7
    // No purge protection (the property only accepts true, and true is irreversible):
    // `azd down --purge` must be able to delete the vault so the environment can be
    // recreated under the same name. Soft delete still keeps deleted secrets 7 days.
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource secretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, principalId, secretsUserRoleId)
  scope: vault
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', secretsUserRoleId)
  }
}

resource secretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(operatorPrincipalId)) {
  name: guid(vault.id, operatorPrincipalId, secretsOfficerRoleId)
  scope: vault
  properties: {
    principalId: operatorPrincipalId
    principalType: operatorPrincipalType
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', secretsOfficerRoleId)
  }
}

output name string = vault.name
output uri string = vault.properties.vaultUri
