//! The handler's settings, read once from the environment (app settings in
//! Azure, `local.settings.json` Values locally). A missing or malformed
//! setting stops startup with a message that names it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::keys::{Access, ApiKeys};
use crate::domain::{AuthorityCode, RetryPolicy};
use crate::providers::client::ProviderEndpoints;
use crate::providers::limits::ClientConfig;
use crate::providers::simulator::Scenario;
use crate::providers::redact::Redactor;
use crate::providers::ProviderName;

/// The authority codes accepted when `TICKETPAY_AUTHORITIES` is not set.
pub const DEFAULT_AUTHORITIES: &str = "CITY-PARKING,STATE-TOLLS,METRO-TRANSIT,HIGHWAY-PATROL,WATER-UTILITY";

/// The API keys and the role of each (see [`crate::api::access`]).
pub const API_KEYS: &str = "TICKETPAY_API_KEYS";

/// Set by App Service, and so by Azure Functions, on every instance of an app:
/// their presence means the handler runs in Azure.
const AZURE_MARKERS: [&str; 2] = ["WEBSITE_INSTANCE_ID", "WEBSITE_SITE_NAME"];

#[derive(Debug, thiserror::Error)]
#[error("setting {name}: {problem}")]
pub struct SettingError {
    pub name: String,
    pub problem: String,
}

fn setting_error(name: &str, problem: impl Into<String>) -> SettingError {
    SettingError { name: name.to_owned(), problem: problem.into() }
}

/// Where settings are read from: a name to its value, if set.
type Source<'a> = Box<dyn Fn(&str) -> Option<String> + 'a>;

/// Reads settings from a source (the process environment, or a map in tests).
pub struct Settings<'a> {
    get: Source<'a>,
}

impl<'a> Settings<'a> {
    pub fn from_env() -> Settings<'static> {
        Settings { get: Box::new(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty())) }
    }

    pub fn from_map(map: &'a HashMap<String, String>) -> Settings<'a> {
        Settings { get: Box::new(move |k| map.get(k).cloned().filter(|v| !v.trim().is_empty())) }
    }

    pub fn optional(&self, name: &str) -> Option<String> {
        (self.get)(name)
    }

    pub fn required(&self, name: &str) -> Result<String, SettingError> {
        self.optional(name).ok_or_else(|| setting_error(name, "is required but not set"))
    }

    pub fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, SettingError> {
        match self.optional(name) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| setting_error(name, format!("`{v}` is not a valid number"))),
        }
    }

    pub fn list(&self, name: &str) -> Vec<String> {
        self.optional(name)
            .map(|v| v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    }
}

/// The local host's Service Bus REST endpoints, and the token it made for them.
pub const BUS_URL: &str = "TICKETPAY_BUS_URL";
pub const BUS_TOKEN: &str = "TICKETPAY_BUS_TOKEN";

/// Where next-stage messages go, and how the sender proves who it is.
#[derive(Clone, PartialEq, Eq)]
pub enum BusConfig {
    /// The local host's Service Bus REST endpoints, with the bearer token the
    /// host gave its handler (none: the host refuses the messages).
    Local { url: String, token: Option<String> },
    /// An Azure Service Bus namespace, reached with an Entra token.
    Azure { url: String, identity: Identity },
}

/// Which Entra identity the app uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The managed identity of the Function App (user-assigned if a client id is given).
    Managed { client_id: Option<String> },
    /// Whoever is logged in with `az login` or `azd auth login` on this workstation.
    Developer,
}

impl Identity {
    /// Functions conventions: `<connection>__credential=managedidentity` and
    /// `<connection>__clientId`, else `AZURE_CLIENT_ID`; inside Azure the
    /// platform's `IDENTITY_ENDPOINT` also means a managed identity.
    pub fn for_connection(s: &Settings<'_>, connection: &str) -> Identity {
        let credential = s.optional(&format!("{connection}__credential")).unwrap_or_default();
        let client_id = s.optional(&format!("{connection}__clientId")).or_else(|| s.optional("AZURE_CLIENT_ID"));
        if credential.eq_ignore_ascii_case("managedidentity") || s.optional("IDENTITY_ENDPOINT").is_some() {
            Identity::Managed { client_id }
        } else {
            Identity::Developer
        }
    }

    pub fn credential(&self) -> anyhow::Result<std::sync::Arc<dyn azure_core::credentials::TokenCredential>> {
        use azure_identity::{DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
        Ok(match self {
            Identity::Managed { client_id } => ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                ..Default::default()
            }))?,
            Identity::Developer => DeveloperToolsCredential::new(None)?,
        })
    }
}

fn load_bus(s: &Settings<'_>) -> Result<BusConfig, SettingError> {
    const NAMESPACE: &str = "ServiceBusConnection__fullyQualifiedNamespace";
    if let Some(ns) = s.optional(NAMESPACE) {
        let ns = ns.trim();
        let valid = !ns.contains("://") && !ns.contains('/') && ns.contains('.') && !ns.contains(char::is_whitespace);
        if !valid {
            return Err(setting_error(NAMESPACE, format!("`{ns}` is not a namespace host name like mybus.servicebus.windows.net")));
        }
        let identity = Identity::for_connection(s, "ServiceBusConnection");
        return Ok(BusConfig::Azure { url: format!("https://{ns}"), identity });
    }
    let url = s
        .optional(BUS_URL)
        .ok_or_else(|| setting_error(BUS_URL, format!("is required (or {NAMESPACE} for Azure Service Bus)")))?;
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(setting_error(BUS_URL, format!("`{url}` is not an http(s) URL")));
    }
    Ok(BusConfig::Local { url, token: s.optional(BUS_TOKEN) })
}

/// Never prints the local token.
impl std::fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BusConfig::Local { url, token } => {
                f.debug_struct("Local").field("url", url).field("token", &token.as_ref().map(|_| "..")).finish()
            }
            BusConfig::Azure { url, identity } => f.debug_struct("Azure").field("url", url).field("identity", identity).finish(),
        }
    }
}

/// Where tickets, batches and the audit trail are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// SQLite in this folder's `store.db` (the local default).
    Embedded { path: PathBuf },
    /// An Azure Cosmos DB (NoSQL) account, reached with an Entra token.
    Cosmos { endpoint: String, database: String, identity: Identity },
    /// The Cosmos store code on the SDK's in-memory emulator, inside the handler's
    /// own process (a build with the `cosmos-emulator` feature), behaving as
    /// `emulation` says; what the requests cost is written to `charges` as they go.
    CosmosEmulator { emulation: Emulation, charges: PathBuf },
}

/// How the emulated Cosmos account behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Emulation {
    /// Each container's provisioned throughput, in RU/s: past it the emulator
    /// answers single-document writes 429. `None`: unlimited.
    pub ru_per_second: Option<u64>,
    /// Of every hundred transactional batches, how many are answered 429 (with a
    /// retry-after) before they reach the emulator, by the SDK's fault injection:
    /// the emulator never holds a transactional batch to the throughput itself.
    pub throttled_batches_percent: u8,
    /// Of every hundred writes, how many are applied but their answer lost on the
    /// way back (the SDK's fault injection: a response timeout after the service
    /// applied the write), as a network can lose an answer.
    pub lost_answers_percent: u8,
}

impl Emulation {
    /// Checks the settings a command line or the environment gave.
    pub fn new(ru_per_second: Option<u64>, throttled_batches: Option<u8>, lost_answers: Option<u8>) -> Result<Emulation, String> {
        if let Some(ru) = ru_per_second.filter(|ru| *ru < MIN_EMULATOR_THROUGHPUT) {
            return Err(format!("the throughput must be at least {MIN_EMULATOR_THROUGHPUT} RU/s (got {ru})"));
        }
        let throttled_batches_percent = throttled_batches.unwrap_or(0);
        if throttled_batches_percent > MAX_THROTTLED_BATCHES_PERCENT {
            return Err(format!("at most {MAX_THROTTLED_BATCHES_PERCENT} of every hundred batches can be throttled (got {throttled_batches_percent})"));
        }
        let lost_answers_percent = lost_answers.unwrap_or(0);
        if lost_answers_percent > MAX_LOST_ANSWERS_PERCENT {
            return Err(format!("at most {MAX_LOST_ANSWERS_PERCENT} of every hundred answers can be lost (got {lost_answers_percent})"));
        }
        Ok(Emulation { ru_per_second, throttled_batches_percent, lost_answers_percent })
    }
}

/// `TICKETPAY_STORE`: which store the handler keeps its state in, when no Cosmos account is set.
pub const STORE: &str = "TICKETPAY_STORE";
/// `TICKETPAY_COSMOS_EMULATOR_RU_PER_S`: the emulated containers' throughput (at least [`MIN_EMULATOR_THROUGHPUT`]).
pub const EMULATOR_THROUGHPUT: &str = "TICKETPAY_COSMOS_EMULATOR_RU_PER_S";
/// The least throughput a container is provisioned with, in RU/s (the emulator's rule, as Azure's).
pub const MIN_EMULATOR_THROUGHPUT: u64 = 400;
/// `TICKETPAY_COSMOS_EMULATOR_THROTTLED_BATCHES`: of every hundred transactional batches, how many are answered 429.
pub const EMULATOR_THROTTLED_BATCHES: &str = "TICKETPAY_COSMOS_EMULATOR_THROTTLED_BATCHES";
/// The most transactional batches in a hundred that may be throttled. The SDK
/// tries a throttled request 19 times: at 75 in a hundred, 1 in 240 batches is
/// still refused after that, and the stage puts its message off; much past
/// that an upload (a batch for each of 64 ticket partitions) would rarely get through.
pub const MAX_THROTTLED_BATCHES_PERCENT: u8 = 75;
/// `TICKETPAY_COSMOS_EMULATOR_LOST_ANSWERS`: of every hundred writes, how many are applied but their answer lost.
pub const EMULATOR_LOST_ANSWERS: &str = "TICKETPAY_COSMOS_EMULATOR_LOST_ANSWERS";
/// The most answers in a hundred that may be lost: at a quarter every kind of
/// write loses answers many times a run, and a run still ends in seconds.
pub const MAX_LOST_ANSWERS_PERCENT: u8 = 25;
/// The file in the data folder where an emulated store's charges are written.
pub const CHARGES_FILE: &str = "store-charges.json";

fn load_store(s: &Settings<'_>) -> Result<StoreConfig, SettingError> {
    const ENDPOINT: &str = "CosmosDb__accountEndpoint";
    if let Some(endpoint) = s.optional(ENDPOINT) {
        let endpoint = endpoint.trim().to_owned();
        if !endpoint.starts_with("https://") && !endpoint.starts_with("http://") {
            return Err(setting_error(ENDPOINT, format!("`{endpoint}` is not an account URL like https://myaccount.documents.azure.com:443/")));
        }
        let database = s.optional("CosmosDb__database").unwrap_or_else(|| "ticketpay".into());
        return Ok(StoreConfig::Cosmos { endpoint, database, identity: Identity::for_connection(s, "CosmosDb") });
    }
    let dir = PathBuf::from(s.optional("TICKETPAY_DATA_DIR").unwrap_or_else(|| ".ticketpay".into()));
    match s.optional(STORE).as_deref().map(str::trim) {
        None | Some("" | "embedded") => Ok(StoreConfig::Embedded { path: dir.join("store.db") }),
        Some("cosmos-emulator") => {
            let ru_per_second = match s.optional(EMULATOR_THROUGHPUT) {
                None => None,
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(n) if n >= MIN_EMULATOR_THROUGHPUT => Some(n),
                    _ => {
                        return Err(setting_error(EMULATOR_THROUGHPUT, format!("`{v}` is not a throughput of at least {MIN_EMULATOR_THROUGHPUT} RU/s")));
                    }
                },
            };
            let emulation = Emulation {
                ru_per_second,
                throttled_batches_percent: percent_setting(s, EMULATOR_THROTTLED_BATCHES, MAX_THROTTLED_BATCHES_PERCENT)?.unwrap_or(0),
                lost_answers_percent: percent_setting(s, EMULATOR_LOST_ANSWERS, MAX_LOST_ANSWERS_PERCENT)?.unwrap_or(0),
            };
            Ok(StoreConfig::CosmosEmulator { emulation, charges: dir.join(CHARGES_FILE) })
        }
        Some(other) => Err(setting_error(STORE, format!("`{other}` is not a store: embedded or cosmos-emulator"))),
    }
}

/// A setting that is a share in a hundred, at most `max`, if set.
fn percent_setting(s: &Settings<'_>, name: &str, max: u8) -> Result<Option<u8>, SettingError> {
    let Some(v) = s.optional(name) else { return Ok(None) };
    match v.trim().parse::<u8>() {
        Ok(n) if n <= max => Ok(Some(n)),
        _ => Err(setting_error(name, format!("`{v}` is not a share in a hundred from 0 to {max}"))),
    }
}

/// Where the leases on each provider's capacity are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseConfig {
    /// SQLite in the data folder's `leases.db`, shared by every process using the folder.
    Embedded { path: PathBuf },
    /// Blob leases in a container of the Function App's storage account.
    Blob { service_url: String, container: String, identity: Identity },
}

/// The container holding the capacity leases, when `TICKETPAY_LEASE_CONTAINER` does not say.
pub const DEFAULT_LEASE_CONTAINER: &str = "ticketpay-leases";

fn load_leases(s: &Settings<'_>) -> Result<LeaseConfig, SettingError> {
    const SERVICE_URI: &str = "AzureWebJobsStorage__blobServiceUri";
    let service_url = match (s.optional(SERVICE_URI), s.optional("AzureWebJobsStorage__accountName")) {
        (Some(url), _) => Some(url.trim().trim_end_matches('/').to_owned()),
        (None, Some(account)) => Some(format!("https://{}.blob.core.windows.net", account.trim())),
        (None, None) => None,
    };
    let Some(service_url) = service_url else {
        let dir = s.optional("TICKETPAY_DATA_DIR").unwrap_or_else(|| ".ticketpay".into());
        return Ok(LeaseConfig::Embedded { path: PathBuf::from(dir).join("leases.db") });
    };
    if !service_url.starts_with("https://") && !service_url.starts_with("http://") {
        return Err(setting_error(SERVICE_URI, format!("`{service_url}` is not a blob service URL like https://myaccount.blob.core.windows.net")));
    }
    let container = s.optional("TICKETPAY_LEASE_CONTAINER").unwrap_or_else(|| DEFAULT_LEASE_CONTAINER.into());
    Ok(LeaseConfig::Blob { service_url, container, identity: Identity::for_connection(s, "AzureWebJobsStorage") })
}

/// Who this process is among the deployment's instances: `TICKETPAY_INSTANCE_ID`
/// (the local host numbers its handlers), the platform's `WEBSITE_INSTANCE_ID`, or one made up.
fn load_instance(s: &Settings<'_>) -> String {
    s.optional("TICKETPAY_INSTANCE_ID")
        .or_else(|| s.optional("WEBSITE_INSTANCE_ID").map(|id| id.chars().take(16).collect()))
        .unwrap_or_else(|| format!("instance-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]))
}

/// Everything the handler needs to run.
pub struct HandlerConfig {
    pub port: u16,
    pub bus: BusConfig,
    pub store: StoreConfig,
    pub authorities: Vec<AuthorityCode>,
    pub retry: RetryPolicy,
    pub claim_lease: Duration,
    pub endpoints: ProviderEndpoints,
    pub client: ClientConfig,
    pub redactor: Redactor,
    pub access: Access,
    /// Where audit records wait while the store cannot take them.
    pub spool_dir: PathBuf,
    pub sweep: crate::stages::sweep::SweepPolicy,
    pub leases: LeaseConfig,
    pub instance: String,
}

impl HandlerConfig {
    pub fn load(s: &Settings<'_>) -> Result<HandlerConfig, SettingError> {
        let port = s.required("FUNCTIONS_CUSTOMHANDLER_PORT")?;
        let port = port
            .parse()
            .map_err(|_| setting_error("FUNCTIONS_CUSTOMHANDLER_PORT", format!("`{port}` is not a port number")))?;
        let bus = load_bus(s)?;
        let store = load_store(s)?;
        let authority_list = s.optional("TICKETPAY_AUTHORITIES").unwrap_or_else(|| DEFAULT_AUTHORITIES.into());
        let authorities = authority_list
            .split(',')
            .map(|a| AuthorityCode::parse(a.trim()).map_err(|e| setting_error("TICKETPAY_AUTHORITIES", e)))
            .collect::<Result<Vec<_>, _>>()?;
        let retry = RetryPolicy {
            max_attempts: s.number("TICKETPAY_MAX_ATTEMPTS", 8)?,
            base: Duration::from_millis(s.number("TICKETPAY_RETRY_BASE_MS", 500)?),
            cap: Duration::from_millis(s.number("TICKETPAY_RETRY_CAP_MS", 60_000)?),
        };
        if retry.max_attempts == 0 {
            return Err(setting_error("TICKETPAY_MAX_ATTEMPTS", "must be at least 1"));
        }
        let client = load_client_config(s)?;
        // A claimant is done within one slot wait and one call; twice that, and it is gone.
        let claim_lease = 2 * (crate::providers::client::MAX_SLOT_WAIT + client.timeout);
        let endpoints = load_endpoints(s)?;
        let redactor = Redactor::new(&s.list("TICKETPAY_REDACT_HEADERS"), &s.list("TICKETPAY_REDACT_FIELDS"))
            .with_secrets(endpoints.api_keys.values());
        let access = load_access(s)?;
        let spool_dir = match (s.optional("TICKETPAY_SPOOL_DIR"), &store) {
            (Some(dir), _) => PathBuf::from(dir),
            (None, StoreConfig::Embedded { path }) => path.with_file_name("audit-spool"),
            (None, StoreConfig::CosmosEmulator { charges, .. }) => charges.with_file_name("audit-spool"),
            (None, StoreConfig::Cosmos { .. }) => std::env::temp_dir().join("ticketpay-audit-spool"),
        };
        let defaults = crate::stages::sweep::SweepPolicy::default();
        let sweep = crate::stages::sweep::SweepPolicy {
            overdue_after: Duration::from_secs(s.number("TICKETPAY_SWEEP_OVERDUE_SECS", defaults.overdue_after.as_secs())?),
            max_resends: s.number("TICKETPAY_SWEEP_MAX_RESENDS", defaults.max_resends)?,
        };
        let leases = load_leases(s)?;
        let instance = load_instance(s);
        Ok(HandlerConfig {
            port,
            bus,
            store,
            authorities,
            retry,
            claim_lease,
            endpoints,
            client,
            redactor,
            access,
            spool_dir,
            sweep,
            leases,
            instance,
        })
    }
}

/// Without keys the API is open, which is only ever allowed outside Azure.
fn load_access(s: &Settings<'_>) -> Result<Access, SettingError> {
    let Some(json) = s.optional(API_KEYS) else {
        if let Some(marker) = AZURE_MARKERS.iter().find(|m| s.optional(m).is_some()) {
            let problem = format!("is required in Azure ({marker} is set): without it the API would be open to anyone");
            return Err(setting_error(API_KEYS, problem));
        }
        return Ok(Access::Open);
    };
    if json.trim_start().starts_with("@Microsoft.KeyVault(") {
        let problem = "is a Key Vault reference the platform could not resolve: check that the secret exists and the app's identity may read it";
        return Err(setting_error(API_KEYS, problem));
    }
    ApiKeys::parse(&json).map(Access::Keys).map_err(|e| setting_error(API_KEYS, e))
}

fn load_client_config(s: &Settings<'_>) -> Result<ClientConfig, SettingError> {
    const NAME: &str = "TICKETPAY_PROVIDERS_CONFIG";
    let source = s.optional(NAME);
    let scenario = Scenario::load(source.as_deref()).map_err(|e| setting_error(NAME, format!("{e:#}")))?;
    Ok(ClientConfig::from_scenario(&scenario))
}

/// Each provider's URL: `TICKETPAY_PROVIDER_URL_<NAME>`, or `TICKETPAY_PROVIDERS_URL/<name>`.
/// Each provider's key, if it needs one: `TICKETPAY_PROVIDER_KEY_<NAME>`.
fn load_endpoints(s: &Settings<'_>) -> Result<ProviderEndpoints, SettingError> {
    let common = s.optional("TICKETPAY_PROVIDERS_URL");
    let mut base_urls = HashMap::new();
    let mut api_keys = HashMap::new();
    for name in ProviderName::ALL {
        let upper = name.as_str().to_ascii_uppercase();
        let own = format!("TICKETPAY_PROVIDER_URL_{upper}");
        let url = match (s.optional(&own), &common) {
            (Some(url), _) => url,
            (None, Some(base)) => format!("{}/{}", base.trim_end_matches('/'), name),
            (None, None) => {
                return Err(setting_error("TICKETPAY_PROVIDERS_URL", format!("is required (or {own}) to reach the {name} provider")));
            }
        };
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(setting_error(&own, format!("`{url}` is not an http(s) URL")));
        }
        base_urls.insert(name, url);
        if let Some(key) = s.optional(&format!("TICKETPAY_PROVIDER_KEY_{upper}")) {
            api_keys.insert(name, key);
        }
    }
    Ok(ProviderEndpoints { base_urls, api_keys })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_namespace_means_azure_service_bus_with_the_apps_identity() {
        let map = settings(&[
            ("ServiceBusConnection__fullyQualifiedNamespace", "sb-tp.servicebus.windows.net"),
            ("ServiceBusConnection__credential", "managedidentity"),
            ("ServiceBusConnection__clientId", "1111-2222"),
            ("TICKETPAY_BUS_URL", "http://127.0.0.1:7071"),
        ]);
        let bus = load_bus(&Settings::from_map(&map)).unwrap();
        let identity = Identity::Managed { client_id: Some("1111-2222".into()) };
        assert_eq!(bus, BusConfig::Azure { url: "https://sb-tp.servicebus.windows.net".into(), identity });
    }

    #[test]
    fn azure_client_id_names_the_user_assigned_identity_and_a_workstation_uses_the_developer() {
        let map = settings(&[("IDENTITY_ENDPOINT", "http://169.254.1.1/msi"), ("AZURE_CLIENT_ID", "abc")]);
        assert_eq!(Identity::for_connection(&Settings::from_map(&map), "ServiceBusConnection"), Identity::Managed { client_id: Some("abc".into()) });
        let none = settings(&[]);
        assert_eq!(Identity::for_connection(&Settings::from_map(&none), "ServiceBusConnection"), Identity::Developer);
    }

    #[test]
    fn a_cosmos_endpoint_chooses_the_cosmos_store_with_the_apps_identity() {
        let map = settings(&[
            ("CosmosDb__accountEndpoint", "https://cosmos-tp.documents.azure.com:443/"),
            ("CosmosDb__credential", "managedidentity"),
            ("AZURE_CLIENT_ID", "abc"),
            ("TICKETPAY_DATA_DIR", "/tmp/x"),
        ]);
        let store = load_store(&Settings::from_map(&map)).unwrap();
        let expected = StoreConfig::Cosmos {
            endpoint: "https://cosmos-tp.documents.azure.com:443/".into(),
            database: "ticketpay".into(),
            identity: Identity::Managed { client_id: Some("abc".into()) },
        };
        assert_eq!(store, expected);
        let local = settings(&[("TICKETPAY_DATA_DIR", "/tmp/x")]);
        assert_eq!(load_store(&Settings::from_map(&local)).unwrap(), StoreConfig::Embedded { path: "/tmp/x/store.db".into() });
        let bad = settings(&[("CosmosDb__accountEndpoint", "cosmos-tp.documents.azure.com")]);
        assert_eq!(load_store(&Settings::from_map(&bad)).unwrap_err().name, "CosmosDb__accountEndpoint");
    }

    #[test]
    fn the_emulated_cosmos_store_is_chosen_by_name_with_its_throughput_and_faults() {
        let load = |pairs: &[(&str, &str)]| load_store(&Settings::from_map(&settings(pairs)));
        let dir = ("TICKETPAY_DATA_DIR", "/tmp/x");
        assert_eq!(
            load(&[dir, (STORE, "cosmos-emulator"), (EMULATOR_THROUGHPUT, "4000")]).unwrap(),
            StoreConfig::CosmosEmulator {
                emulation: Emulation { ru_per_second: Some(4000), ..Emulation::default() },
                charges: "/tmp/x/store-charges.json".into()
            }
        );
        assert_eq!(
            load(&[dir, (STORE, "cosmos-emulator")]).unwrap(),
            StoreConfig::CosmosEmulator { emulation: Emulation::default(), charges: "/tmp/x/store-charges.json".into() }
        );
        assert_eq!(
            load(&[dir, (STORE, "cosmos-emulator"), (EMULATOR_THROTTLED_BATCHES, "30"), (EMULATOR_LOST_ANSWERS, "5")]).unwrap(),
            StoreConfig::CosmosEmulator {
                emulation: Emulation { ru_per_second: None, throttled_batches_percent: 30, lost_answers_percent: 5 },
                charges: "/tmp/x/store-charges.json".into()
            }
        );
        for bad in ["76", "-1", "half"] {
            assert_eq!(load(&[(STORE, "cosmos-emulator"), (EMULATOR_THROTTLED_BATCHES, bad)]).unwrap_err().name, EMULATOR_THROTTLED_BATCHES);
        }
        for bad in ["26", "some"] {
            assert_eq!(load(&[(STORE, "cosmos-emulator"), (EMULATOR_LOST_ANSWERS, bad)]).unwrap_err().name, EMULATOR_LOST_ANSWERS);
        }
        assert_eq!(load(&[dir, (STORE, "embedded")]).unwrap(), StoreConfig::Embedded { path: "/tmp/x/store.db".into() });
        assert_eq!(load(&[(STORE, "cosmos-emulator"), (EMULATOR_THROUGHPUT, "399")]).unwrap_err().name, EMULATOR_THROUGHPUT);
        assert_eq!(load(&[(STORE, "cosmos-emulator"), (EMULATOR_THROUGHPUT, "lots")]).unwrap_err().name, EMULATOR_THROUGHPUT);
        let unknown = load(&[(STORE, "postgres")]).unwrap_err();
        assert_eq!(unknown.name, STORE);
        assert!(unknown.to_string().contains("postgres"), "{unknown}");
    }

    #[test]
    fn api_keys_are_optional_locally_but_required_in_azure() {
        assert_eq!(load_access(&Settings::from_map(&settings(&[]))).unwrap(), Access::Open);
        for marker in AZURE_MARKERS {
            let azure = settings(&[(marker, "func-ticketpay-abc")]);
            let err = load_access(&Settings::from_map(&azure)).unwrap_err();
            assert_eq!(err.name, API_KEYS);
            assert!(err.to_string().contains(marker), "{err}");
        }
        let digest = crate::keys::key_digest("k");
        let keys = format!(r#"[{{"name": "ops", "role": "operator", "sha256": "{digest}"}}]"#);
        let configured = settings(&[(API_KEYS, keys.as_str()), ("WEBSITE_INSTANCE_ID", "1")]);
        assert!(matches!(load_access(&Settings::from_map(&configured)).unwrap(), Access::Keys(_)));
    }

    #[test]
    fn malformed_api_keys_stop_startup_with_one_line_naming_the_setting() {
        for bad in [r#"[{"name": "ops", "role": "operator""#, "@Microsoft.KeyVault(VaultName=kv;SecretName=api-keys)", "{}"] {
            let map = settings(&[(API_KEYS, bad)]);
            let err = load_access(&Settings::from_map(&map)).unwrap_err();
            let line = err.to_string();
            assert!(line.starts_with(&format!("setting {API_KEYS}: ")), "{line}");
            assert!(!line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn the_local_bus_takes_the_hosts_token_and_never_prints_it() {
        let map = settings(&[(BUS_URL, "http://127.0.0.1:7071"), (BUS_TOKEN, "s3cret-token")]);
        let bus = load_bus(&Settings::from_map(&map)).unwrap();
        assert_eq!(bus, BusConfig::Local { url: "http://127.0.0.1:7071".into(), token: Some("s3cret-token".into()) });
        assert!(!format!("{bus:?}").contains("s3cret"), "{bus:?}");
        let map = settings(&[(BUS_URL, "http://127.0.0.1:7071")]);
        assert_eq!(load_bus(&Settings::from_map(&map)).unwrap(), BusConfig::Local { url: "http://127.0.0.1:7071".into(), token: None });
    }

    #[test]
    fn a_missing_or_malformed_bus_setting_is_named() {
        let err = load_bus(&Settings::from_map(&settings(&[]))).unwrap_err();
        assert_eq!(err.name, "TICKETPAY_BUS_URL");
        assert!(err.to_string().contains("ServiceBusConnection__fullyQualifiedNamespace"));
        let map = settings(&[("ServiceBusConnection__fullyQualifiedNamespace", "https://sb-tp.servicebus.windows.net/")]);
        assert_eq!(load_bus(&Settings::from_map(&map)).unwrap_err().name, "ServiceBusConnection__fullyQualifiedNamespace");
        let map = settings(&[("TICKETPAY_BUS_URL", "127.0.0.1:7071")]);
        assert!(load_bus(&Settings::from_map(&map)).unwrap_err().to_string().contains("not an http(s) URL"));
    }
}
