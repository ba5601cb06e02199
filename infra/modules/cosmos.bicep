// Cosmos DB (NoSQL API): account, database `ticketpay` and the store's containers.
//
// Data model (the Store seam, Cosmos side; docs/data-model.md):
// - container `records`, partition key `/pk`: a batch's home partition (the
//   batch document with its budget, one commitment per ticket holding budget,
//   reconciliation runs), its tickets spread over 64 ticket partitions with
//   their audit entries (a ticket change and its events are one transactional
//   batch), and one partition per payment claim. No batch is bound to what one
//   logical partition serves. Only the properties queries filter or sort on are
//   indexed (`src/store/cosmos/documents.rs` INDEXED_PATHS).
// - container `idempotency`, partition key `/client_id`: upload idempotency keys
//   (client_id + Idempotency-Key -> batch_id), so a re-sent upload returns the
//   same batch. Read by id only: nothing indexed.
//
// Serverless by default (pay per request unit, no idle cost). Set
// `throughputMode` to 'autoscale' for provisioned autoscale throughput per
// container (serverless vs provisioned cannot be changed on an existing account).

param location string
param tags object
param accountName string
param databaseName string = 'ticketpay'

@allowed([
  'serverless'
  'autoscale'
])
param throughputMode string = 'serverless'

@description('Autoscale maximum RU/s of the records container (throughputMode autoscale only; minimum 1000). 20,000 carries one batch at the providers\' pace (docs/scale.md); the idempotency container gets the minimum.')
@minValue(1000)
param autoscaleMaxThroughput int = 20000

@description('Principal id of the managed identity granted Cosmos DB Built-in Data Contributor.')
param principalId string

var serverless = throughputMode == 'serverless'

// Cosmos DB Built-in Data Contributor (a Cosmos data-plane SQL role, not an Azure RBAC role).
var dataContributorRoleId = '00000000-0000-0000-0000-000000000002'

var containers = [
  {
    name: 'records'
    partitionKey: '/pk'
    maxThroughput: autoscaleMaxThroughput
    includedPaths: [
      {
        path: '/id/?'
      }
      {
        path: '/type/?'
      }
      {
        path: '/client_id/?'
      }
      {
        path: '/created_us/?'
      }
      {
        path: '/open/?'
      }
      {
        path: '/status/?'
      }
      {
        path: '/notified/?'
      }
      {
        path: '/due_us/?'
      }
      {
        path: '/reference/?'
      }
      {
        path: '/at_us/?'
      }
    ]
  }
  {
    name: 'idempotency'
    partitionKey: '/client_id'
    maxThroughput: 1000
    includedPaths: []
  }
]

resource account 'Microsoft.DocumentDB/databaseAccounts@2024-11-15' = {
  // checkov:skip=CKV_AZURE_99:Reached from Flex Consumption over the public endpoint (no VNet in this template); access needs an Entra token and the SQL role below.
  // checkov:skip=CKV_AZURE_101:Public network access is needed: Flex Consumption without a VNet reaches Cosmos DB over the public endpoint; local (key) auth is disabled.
  name: accountName
  location: location
  tags: tags
  kind: 'GlobalDocumentDB'
  properties: {
    databaseAccountOfferType: 'Standard'
    consistencyPolicy: {
      defaultConsistencyLevel: 'Session'
    }
    locations: [
      {
        locationName: location
        failoverPriority: 0
        isZoneRedundant: false
      }
    ]
    capabilities: serverless ? [
      {
        name: 'EnableServerless'
      }
    ] : []
    // Entra ID only: no account keys for data, and no key-based metadata writes.
    disableLocalAuth: true
    disableKeyBasedMetadataWriteAccess: true
    minimalTlsVersion: 'Tls12'
    publicNetworkAccess: 'Enabled'
  }
}

resource database 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases@2024-11-15' = {
  parent: account
  name: databaseName
  properties: {
    resource: {
      id: databaseName
    }
  }
}

resource container 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers@2024-11-15' = [
  for c in containers: {
    parent: database
    name: c.name
    properties: {
      resource: {
        id: c.name
        partitionKey: {
          paths: [
            c.partitionKey
          ]
          kind: 'Hash'
          version: 2
        }
        indexingPolicy: {
          indexingMode: 'consistent'
          automatic: true
          includedPaths: c.includedPaths
          excludedPaths: [
            {
              path: '/*'
            }
          ]
        }
      }
      options: serverless ? {} : {
        autoscaleSettings: {
          maxThroughput: c.maxThroughput
        }
      }
    }
  }
]

resource dataContributor 'Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments@2024-11-15' = {
  parent: account
  name: guid(account.id, principalId, dataContributorRoleId)
  properties: {
    roleDefinitionId: '${account.id}/sqlRoleDefinitions/${dataContributorRoleId}'
    principalId: principalId
    scope: account.id
  }
}

output name string = account.name
output endpoint string = account.properties.documentEndpoint
output databaseName string = database.name
