// The user-assigned managed identity the function app runs as. Every data-plane
// permission (Service Bus, Cosmos DB, storage, Key Vault, Application Insights)
// is granted to this identity by the module that owns the resource.

param location string
param tags object
param name string

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
