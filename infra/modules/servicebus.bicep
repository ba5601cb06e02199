// Service Bus namespace (Standard: duplicate detection and sessions need at
// least Standard) with one queue per queue-triggered function. The queue list
// and each queue's settings come from main.bicep (`queues`), which mirrors
// functions/*/function.json; tests/infra.rs keeps the two equal.

param location string
param tags object
param name string

@description('Queues to create: [{ name, lockDuration, maxDeliveryCount, duplicateDetectionHistoryTimeWindow, requiresSession, deadLetteringOnMessageExpiration }].')
param queues array

@description('Principal id of the managed identity that sends (handler) and receives (Functions host).')
param principalId string

// Azure Service Bus Data Sender / Data Receiver (built-in roles).
var dataSenderRoleId = '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39'
var dataReceiverRoleId = '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'

resource namespace 'Microsoft.ServiceBus/namespaces@2024-01-01' = {
  name: name
  location: location
  tags: tags
  sku: {
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    // Entra ID only: no SAS keys.
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
  }
}

resource queue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' = [
  for q in queues: {
    parent: namespace
    name: q.name
    properties: {
      lockDuration: q.lockDuration
      maxDeliveryCount: q.maxDeliveryCount
      requiresDuplicateDetection: true
      duplicateDetectionHistoryTimeWindow: q.duplicateDetectionHistoryTimeWindow
      requiresSession: q.requiresSession
      deadLetteringOnMessageExpiration: q.deadLetteringOnMessageExpiration
    }
  }
]

resource sender 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(namespace.id, principalId, dataSenderRoleId)
  scope: namespace
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', dataSenderRoleId)
  }
}

resource receiver 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(namespace.id, principalId, dataReceiverRoleId)
  scope: namespace
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', dataReceiverRoleId)
  }
}

// serviceBusEndpoint is `https://<namespace>.servicebus.windows.net:443/` (the
// suffix differs in sovereign clouds): keep the host name only. Its third
// '/'-separated field is `<host>:443`.
var fullyQualifiedNamespace = split(split(namespace.properties.serviceBusEndpoint, '/')[2], ':')[0]

output name string = namespace.name
output fullyQualifiedNamespace string = fullyQualifiedNamespace
output endpoint string = 'https://${fullyQualifiedNamespace}'
