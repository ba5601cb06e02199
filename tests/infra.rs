//! Offline checks of the Azure deployment in `infra/`: every Bicep file parses
//! (tree-sitter-bicep), the Service Bus queues match the queue triggers in
//! `functions/*/function.json`, and the function app sets every setting the
//! binary reads. Bicep is read through its syntax tree, not with text patterns,
//! wherever a value is compared.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tree_sitter::{Node, Parser, Tree};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn bicep_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            bicep_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "bicep") {
            out.push(path);
        }
    }
}

fn parse(src: &str) -> Tree {
    let mut parser = Parser::new();
    parser.set_language(&tree_sitter_bicep::LANGUAGE.into()).expect("load the Bicep grammar");
    parser.parse(src, None).expect("parse")
}

/// A Bicep file and its syntax tree.
struct Bicep {
    path: PathBuf,
    src: String,
    tree: Tree,
}

impl Bicep {
    fn load(rel: &str) -> Bicep {
        let path = root().join(rel);
        let src = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let tree = parse(&src);
        Bicep { path, src, tree }
    }

    fn text(&self, node: Node) -> &str {
        &self.src[node.byte_range()]
    }

    /// The value of top-level `var <name> = <value>`, as JSON: literal objects,
    /// arrays, strings, numbers and booleans become JSON values; any other
    /// expression (parameter, function call, interpolated string) becomes
    /// `{"expr": "<its source text>"}`.
    fn var(&self, name: &str) -> Value {
        let top = self.tree.root_node();
        let mut cursor = top.walk();
        for decl in top.named_children(&mut cursor).filter(|n| n.kind() == "variable_declaration") {
            let mut c = decl.walk();
            let parts: Vec<Node> = decl.named_children(&mut c).filter(|n| n.kind() != "comment").collect();
            if parts.first().is_some_and(|id| self.text(*id) == name) {
                return self.value(*parts.last().unwrap());
            }
        }
        panic!("{}: no `var {name}`", self.path.display())
    }

    fn value(&self, node: Node) -> Value {
        let mut cursor = node.walk();
        let children: Vec<Node> = node.named_children(&mut cursor).filter(|n| n.kind() != "comment").collect();
        match node.kind() {
            "object" => {
                let mut map = serde_json::Map::new();
                for prop in children.iter().filter(|n| n.kind() == "object_property") {
                    let mut c = prop.walk();
                    let kv: Vec<Node> = prop.named_children(&mut c).filter(|n| n.kind() != "comment").collect();
                    let key = self.text(kv[0]).trim_matches('\'').to_owned();
                    map.insert(key, self.value(*kv.last().unwrap()));
                }
                Value::Object(map)
            }
            "array" => Value::Array(children.iter().map(|n| self.value(*n)).collect()),
            "string" if children.iter().all(|n| n.kind() == "string_content") => {
                Value::String(children.iter().map(|n| self.text(*n)).collect())
            }
            "number" => json!(self.text(node).parse::<i64>().unwrap()),
            "boolean" => json!(self.text(node) == "true"),
            _ => json!({ "expr": self.text(node) }),
        }
    }
}

#[test]
fn every_bicep_file_parses() {
    let mut files = Vec::new();
    bicep_files(&root().join("infra"), &mut files);
    files.sort();
    assert!(files.iter().any(|f| f.ends_with("infra/main.bicep")), "infra/main.bicep is missing");
    let mut problems = Vec::new();
    for path in &files {
        let src = fs::read_to_string(path).unwrap();
        let tree = parse(&src);
        let mut stack = vec![tree.root_node()];
        while let Some(node) = stack.pop() {
            if node.is_error() || node.is_missing() {
                let p = node.start_position();
                let what = if node.is_missing() { format!("MISSING {}", node.kind()) } else { "ERROR".to_owned() };
                problems.push(format!("{}:{}:{}: syntax {what}", path.display(), p.row + 1, p.column + 1));
            }
            let mut cursor = node.walk();
            stack.extend(node.children(&mut cursor));
        }
    }
    assert!(problems.is_empty(), "Bicep syntax errors:\n{}", problems.join("\n"));
}

/// Each queue-triggered function's queue, as main.bicep's `queues` entries spell it.
fn queues_from_function_json() -> BTreeMap<String, Value> {
    let mut queues = BTreeMap::new();
    for entry in fs::read_dir(root().join("functions")).unwrap() {
        let dir = entry.unwrap().path();
        let file = dir.join("function.json");
        let Ok(text) = fs::read_to_string(&file) else { continue };
        let function = dir.file_name().unwrap().to_string_lossy().into_owned();
        let spec: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for b in spec["bindings"].as_array().unwrap() {
            if b["type"] != "serviceBusTrigger" {
                continue;
            }
            assert_eq!(b["connection"], "ServiceBusConnection", "{}: connection", file.display());
            let s = &b["queueSettings"];
            for key in ["lockDuration", "maxDeliveryCount", "duplicateDetectionHistoryTimeWindow", "deadLetteringOnMessageExpiration"] {
                assert!(!s[key].is_null(), "{}: queueSettings.{key} is missing", file.display());
            }
            queues.insert(
                function.clone(),
                json!({
                    "function": function,
                    "name": b["queueName"],
                    "lockDuration": s["lockDuration"],
                    "maxDeliveryCount": s["maxDeliveryCount"],
                    "duplicateDetectionHistoryTimeWindow": s["duplicateDetectionHistoryTimeWindow"],
                    "requiresSession": b["isSessionsEnabled"].as_bool().unwrap_or(false),
                    "deadLetteringOnMessageExpiration": s["deadLetteringOnMessageExpiration"],
                }),
            );
        }
    }
    queues
}

#[test]
fn service_bus_queues_match_the_queue_triggers() {
    let expected = queues_from_function_json();
    assert!(!expected.is_empty(), "no serviceBusTrigger in functions/*/function.json");
    let main = Bicep::load("infra/main.bicep");
    let declared: BTreeMap<String, Value> = main
        .var("queues")
        .as_array()
        .expect("`var queues` is an array literal")
        .iter()
        .map(|q| (q["function"].as_str().expect("each queue names its function").to_owned(), q.clone()))
        .collect();
    assert_eq!(
        declared.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "main.bicep `queues` must have one entry per queue-triggered function"
    );
    for (function, want) in &expected {
        assert_eq!(&declared[function], want, "queue of function `{function}`: main.bicep vs functions/{function}/function.json");
    }

    // The module turns each entry into a queue with those settings, duplicate detection on.
    let sb = Bicep::load("infra/modules/servicebus.bicep");
    for line in [
        "name: q.name",
        "lockDuration: q.lockDuration",
        "maxDeliveryCount: q.maxDeliveryCount",
        "requiresDuplicateDetection: true",
        "duplicateDetectionHistoryTimeWindow: q.duplicateDetectionHistoryTimeWindow",
        "requiresSession: q.requiresSession",
        "deadLetteringOnMessageExpiration: q.deadLetteringOnMessageExpiration",
    ] {
        assert!(sb.src.contains(line), "servicebus.bicep: queue property `{line}` is missing");
    }
    assert!(main.src.contains("queues: queues"), "main.bicep must pass `queues` to the Service Bus module");
}

/// Settings in local.settings.json.example that the Bicep does not set by name, and why.
const NOT_SET_BY_NAME: &[(&str, &str)] = &[
    ("TICKETPAY_DATA_DIR", "local only: folder of the embedded store; in Azure the store is Cosmos DB (CosmosDb__*)"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "local only: an OTLP collector; in Azure spans go to Application Insights"),
    ("TICKETPAY_SPOOL_DIR", "in Azure the instance's temp folder, the default"),
    (
        "TICKETPAY_PROVIDER_URL_GATEWAY",
        "an example of TICKETPAY_PROVIDER_URL_<NAME>: set for each provider in the `providerUrls` parameter (checked below)",
    ),
    (
        "TICKETPAY_PROVIDER_KEY_GATEWAY",
        "an example of TICKETPAY_PROVIDER_KEY_<NAME>: a Key Vault reference for each provider in `providerKeyNames` (checked below)",
    ),
];

/// TICKETPAY_* names in src/ that are not app settings of the function app, and why.
const NOT_APP_SETTINGS: &[(&str, &str)] = &[
    ("TICKETPAY_URL", "read by the command-line tools (submit, status, trace) on an operator's machine"),
    ("TICKETPAY_API_KEY", "the key the command-line tools send, on the caller's machine"),
    ("TICKETPAY_DATA_DIR", "local only (see above)"),
    ("TICKETPAY_INSTANCE_ID", "local only: the local host names each handler it starts; in Azure the platform's WEBSITE_INSTANCE_ID names the instance"),
    ("TICKETPAY_BUS_TOKEN", "local only: the token the local host makes at start and gives its handler; in Azure the handler sends with an Entra token"),
    ("TICKETPAY_STORE", "local only: `ticketpay local --store cosmos-emulator` sets it; in Azure CosmosDb__accountEndpoint chooses the store"),
    ("TICKETPAY_COSMOS_EMULATOR_RU_PER_S", "local only: the emulated store's throughput, set by `ticketpay local --cosmos-ru-per-s`"),
    ("TICKETPAY_COSMOS_EMULATOR_THROTTLED_BATCHES", "local only: the share of the emulated store's transactional batches answered 429, set by `ticketpay local --cosmos-throttled-batches`"),
    ("TICKETPAY_COSMOS_EMULATOR_LOST_ANSWERS", "local only: the share of the emulated store's writes whose answer is lost, set by `ticketpay local --cosmos-lost-answers`"),
];

#[test]
fn function_app_sets_every_setting_the_binary_reads() {
    let app = Bicep::load("infra/modules/functionapp.bicep");
    let common = app.var("appSettings");
    let premium = app.var("elasticPremiumSettings");
    let common = common.as_object().expect("`var appSettings` is an object literal");
    let premium = premium.as_object().expect("`var elasticPremiumSettings` is an object literal");

    let example: Value =
        serde_json::from_str(&fs::read_to_string(root().join("local.settings.json.example")).unwrap()).unwrap();
    let mut missing = Vec::new();
    for key in example["Values"].as_object().unwrap().keys() {
        if key.starts_with("_comment_") || NOT_SET_BY_NAME.iter().any(|(k, _)| k == key) {
            continue;
        }
        if key == "FUNCTIONS_WORKER_RUNTIME" {
            // Elastic Premium takes it as a setting; Flex Consumption rejects it and
            // takes functionAppConfig.runtime instead.
            assert_eq!(premium.get(key), Some(&json!("custom")), "FUNCTIONS_WORKER_RUNTIME on Elastic Premium");
            assert!(
                app.src.contains("runtime: {\n        name: 'custom'\n        version: '1.0'\n      }"),
                "Flex Consumption functionAppConfig.runtime must be custom 1.0"
            );
            continue;
        }
        if !common.contains_key(key) {
            missing.push(key.clone());
        }
    }
    assert!(missing.is_empty(), "settings from local.settings.json.example not set in functionapp.bicep: {missing:?}");

    // Families of per-provider settings.
    assert!(app.src.contains("name: 'TICKETPAY_PROVIDER_URL_${toUpper(p.key)}'"), "TICKETPAY_PROVIDER_URL_<NAME> settings");
    assert!(app.src.contains("name: 'TICKETPAY_PROVIDER_KEY_${toUpper(n)}'"), "TICKETPAY_PROVIDER_KEY_<NAME> settings");
    assert!(
        app.src.contains("value: '@Microsoft.KeyVault(VaultName=${keyVaultName};SecretName=provider-key-${toLower(n)})'"),
        "provider keys must be Key Vault references"
    );
    assert!(
        app.src.contains("appSettings: concat(commonAndPlanSettings, providerUrlSettings, providerKeySettings)"),
        "the site must apply every group of settings"
    );

    // Every TICKETPAY_* name the source code reads is in the example (and so checked above).
    let mut in_source = BTreeSet::new();
    let mut stack = vec![root().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = fs::read_to_string(&path).unwrap();
                for (i, _) in text.match_indices("\"TICKETPAY_") {
                    let name: String = text[i + 1..].chars().take_while(|c| c.is_ascii_uppercase() || *c == '_').collect();
                    if !name.ends_with('_') && text[i + 1 + name.len()..].starts_with('"') {
                        in_source.insert(name);
                    }
                }
            }
        }
    }
    let values = example["Values"].as_object().unwrap();
    let unknown: Vec<_> = in_source
        .iter()
        .filter(|n| !values.contains_key(n.as_str()) && !NOT_APP_SETTINGS.iter().any(|(k, _)| k == n))
        .collect();
    assert!(unknown.is_empty(), "settings read in src/ but missing from local.settings.json.example: {unknown:?}");

    // Identity-based connections, as the Functions host and the handler expect them.
    for (key, want) in [
        ("AzureWebJobsStorage__credential", json!("managedidentity")),
        ("ServiceBusConnection__credential", json!("managedidentity")),
        ("AzureWebJobsStorage__accountName", json!({ "expr": "storageAccountName" })),
        ("AzureWebJobsStorage__clientId", json!({ "expr": "identityClientId" })),
        ("ServiceBusConnection__fullyQualifiedNamespace", json!({ "expr": "serviceBusFullyQualifiedNamespace" })),
        ("ServiceBusConnection__clientId", json!({ "expr": "identityClientId" })),
        ("CosmosDb__accountEndpoint", json!({ "expr": "cosmosEndpoint" })),
        ("CosmosDb__database", json!({ "expr": "cosmosDatabaseName" })),
        ("AZURE_CLIENT_ID", json!({ "expr": "identityClientId" })),
        ("APPLICATIONINSIGHTS_CONNECTION_STRING", json!({ "expr": "applicationInsightsConnectionString" })),
        ("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", json!({ "expr": "'Authorization=AAD;ClientId=${identityClientId}'" })),
        ("TICKETPAY_BUS_URL", json!({ "expr": "serviceBusEndpoint" })),
        ("TICKETPAY_API_KEYS", json!({ "expr": "'@Microsoft.KeyVault(VaultName=${keyVaultName};SecretName=api-keys)'" })),
    ] {
        assert_eq!(common.get(key), Some(&want), "functionapp.bicep appSettings.{key}");
    }
}

#[test]
fn cosmos_containers_match_the_store() {
    let cosmos = Bicep::load("infra/modules/cosmos.bicep");
    let indexed = |paths: &[&str]| paths.iter().map(|p| json!({ "path": p })).collect::<Vec<_>>();
    let declared = cosmos.var("containers");
    let declared = declared.as_array().expect("`containers` is a list");
    assert_eq!(declared.len(), ticketpay::store::cosmos::CONTAINERS.len(), "one entry per container the store uses");
    for (entry, (name, path)) in declared.iter().zip(ticketpay::store::cosmos::CONTAINERS) {
        assert_eq!((&entry["name"], &entry["partitionKey"]), (&json!(name), &json!(path)), "container {name}");
    }
    assert_eq!(declared[0]["includedPaths"], json!(indexed(&ticketpay::store::cosmos::INDEXED_PATHS)), "records: exactly what queries use is indexed");
    assert_eq!(declared[1]["includedPaths"], json!([]), "idempotency keys are read by id only");
    assert!(cosmos.src.contains("excludedPaths: [\n            {\n              path: '/*'"), "everything else is left out of the index");
    assert!(cosmos.src.contains("param databaseName string = 'ticketpay'"));
}

#[test]
fn local_authentication_is_disabled_everywhere() {
    for (file, line) in [
        ("infra/modules/servicebus.bicep", "disableLocalAuth: true"),
        ("infra/modules/cosmos.bicep", "disableLocalAuth: true"),
        ("infra/modules/storage.bicep", "allowSharedKeyAccess: false"),
        ("infra/modules/monitoring.bicep", "DisableLocalAuth: true"),
    ] {
        let bicep = Bicep::load(file);
        assert!(bicep.src.contains(line), "{file}: `{line}` is missing");
    }
}
