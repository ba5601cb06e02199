//! The Cosmos store on the SDK's in-memory emulator (a build with the
//! `cosmos-emulator` feature): the account it stands for, what its writes
//! would cost, and the faults of a real account it is asked to show.

use std::sync::Arc;

use azure_core::credentials::Secret;
use azure_core::http::StatusCode;
use azure_data_cosmos::{AccountReference, CosmosClient, CosmosRuntimeBuilder, RoutingStrategy};
use azure_data_cosmos_driver::fault_injection::{
    CustomResponseBuilder, FaultInjectionConditionBuilder, FaultInjectionErrorType, FaultInjectionResult, FaultInjectionResultBuilder,
    FaultInjectionRule, FaultInjectionRuleBuilder, FaultOperationType,
};
use azure_data_cosmos_driver::in_memory_emulator::{
    ContainerConfig, InMemoryEmulatorHttpClient, RequestUnitChargingModel, VirtualAccountConfig, VirtualRegion,
};

use super::transaction::Write;
use super::{map_err, CosmosStore, CONTAINERS, RECORDS};
use crate::config::Emulation;
use crate::store::{Result, StoreError};

impl CosmosStore {
    /// The store on the SDK's in-memory Cosmos emulator, in this process: a new, empty
    /// account with the database and both containers, charging request units by the
    /// emulator's model and, given a throughput, answering 429 past it (as in Azure,
    /// each of a container's physical partitions gets its share of it), with the
    /// faults `emulation` names injected by the SDK (throttled transactional
    /// batches, answers lost after the write applied).
    pub async fn emulated(emulation: Emulation) -> Result<CosmosStore> {
        const URL: &str = "https://local.emulator.local";
        const DATABASE: &str = "ticketpay";
        const REGION: &str = "East US";
        let unavailable = |e: &dyn std::fmt::Display| StoreError::Unavailable(format!("cosmos emulator: {e}"));
        let regions = vec![VirtualRegion::new(REGION, URL.parse().map_err(|e| unavailable(&e))?)];
        let ru_per_second = emulation.ru_per_second;
        let account = VirtualAccountConfig::new(regions).map_err(|e| unavailable(&e))?.with_throttling_enabled(ru_per_second.is_some());
        let emulator = Arc::new(InMemoryEmulatorHttpClient::new(account));
        emulator.store().create_database(DATABASE);
        for (name, path) in CONTAINERS {
            let partitions = match ru_per_second {
                // As provisioned in Azure: each physical partition serves at most 10,000 RU/s.
                Some(ru) => u32::try_from(ru.div_ceil(PHYSICAL_PARTITION_RU)).unwrap_or(u32::MAX).max(1),
                // The emulator copies a physical partition's documents to run a transactional
                // batch on it: unlimited, enough of them that a batch's ticket partitions rarely share one.
                None if name == RECORDS => UNLIMITED_PARTITIONS,
                None => 1,
            };
            let mut config = ContainerConfig::new().with_partition_count(partitions);
            if let Some(ru) = ru_per_second {
                config = config.with_throughput(ru);
            }
            let config = config.build().map_err(|e| unavailable(&e))?;
            let pk = serde_json::from_value(serde_json::json!({"paths": [path], "kind": "Hash", "version": 2})).map_err(|e| unavailable(&e))?;
            emulator.store().create_container_with_config(DATABASE, name, pk, config);
        }
        let faults = faults(emulation);
        let runtime = if faults.is_empty() { emulator.runtime_builder() } else { emulator.runtime_builder_with_fault_rules(faults) };
        let runtime = CosmosRuntimeBuilder::from(runtime).build().await.map_err(|e| unavailable(&e))?;
        let account = AccountReference::with_authentication_key(URL.parse().map_err(|e| unavailable(&e))?, Secret::new("bG9jYWw="));
        let client = CosmosClient::builder()
            .with_runtime(runtime)
            .build(account, RoutingStrategy::ProximityTo(REGION.into()))
            .await
            .map_err(|e| map_err("cosmos emulator", e))?;
        let store = Self::new(client, DATABASE).await?;
        Ok(CosmosStore { pricer: Some(emulator_price), ..store })
    }
}

/// The physical partitions of the emulated records container when its throughput is not
/// capped: as many as a cross-partition query may fan out to (the SDK refuses more than 100).
const UNLIMITED_PARTITIONS: u32 = 100;
/// The most one physical partition serves, in RU/s.
const PHYSICAL_PARTITION_RU: u64 = 10_000;

/// How long a throttled transactional batch is told to wait: as the service says
/// when a partition's second is spent, a fraction of a second.
const THROTTLED_RETRY_AFTER_MS: u32 = 25;

/// The SDK's fault-injection rules for what `emulation` asks of the account.
fn faults(emulation: Emulation) -> Vec<Arc<FaultInjectionRule>> {
    let mut rules = Vec::new();
    if emulation.throttled_batches_percent > 0 {
        rules.push(records_fault("throttled-batches", FaultOperationType::BatchItem, throttled(emulation.throttled_batches_percent)));
    }
    if emulation.lost_answers_percent > 0 {
        let writes = [
            FaultOperationType::BatchItem,
            FaultOperationType::CreateItem,
            FaultOperationType::ReplaceItem,
            FaultOperationType::UpsertItem,
            FaultOperationType::DeleteItem,
            FaultOperationType::PatchItem,
        ];
        for write in writes {
            // Applied by the service, its answer then lost: the SDK reports a response timeout.
            let lost = FaultInjectionResultBuilder::new()
                .with_error(FaultInjectionErrorType::ResponseTimeoutAfterService)
                .with_probability(share(emulation.lost_answers_percent))
                .build();
            rules.push(records_fault("lost-answers", write, lost));
        }
    }
    rules
}

fn share(percent: u8) -> f32 {
    f32::from(percent) / 100.0
}

/// A fault on one kind of request to the records container.
fn records_fault(name: &str, operation: FaultOperationType, result: FaultInjectionResult) -> Arc<FaultInjectionRule> {
    let condition = FaultInjectionConditionBuilder::new().with_operation_type(operation).with_container_id(RECORDS).build();
    Arc::new(FaultInjectionRuleBuilder::new(format!("{name}-{}", operation.as_str()), result).with_condition(condition).build())
}

/// `percent` of requests answered as the service answers one past its partition's
/// throughput: 429, sub-status 3200 (request rate too large), a retry-after, nothing applied.
fn throttled(percent: u8) -> FaultInjectionResult {
    let answer = CustomResponseBuilder::new(StatusCode::TooManyRequests)
        .with_sub_status(3200)
        .with_header("x-ms-retry-after-ms", THROTTLED_RETRY_AFTER_MS.to_string())
        .with_header("x-ms-request-charge", "0")
        .with_body(br#"{"code":"TooManyRequests","message":"Request rate is large. Please retry after sometime."}"#.to_vec())
        .build();
    FaultInjectionResultBuilder::new().with_custom_response(answer).with_probability(share(percent)).build()
}

/// What the SDK's emulator would charge for a write sent on its own: its own
/// request-unit model, which it applies to single requests but not to the
/// operations of a transactional batch.
fn emulator_price(write: Write, size: usize, properties: usize) -> f64 {
    let model = RequestUnitChargingModel::default();
    match write {
        Write::Create => model.compute_create_ru(size, properties),
        Write::Replace | Write::Delete => model.compute_replace_or_delete_ru(size, properties),
    }
}
