//! The OpenAPI document: served as it is kept in the repo, and describing
//! exactly the routes the API router has, method by method.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::Value;

const DOC_PATH: &str = "src/api/openapi.json";
const ROUTER_PATH: &str = "src/api/mod.rs";
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// `(path, method)` for every `.route("PATH", get(..).post(..))` line of the router's source.
fn router_operations(source: &str) -> BTreeSet<(String, String)> {
    let mut operations = BTreeSet::new();
    for line in source.lines().filter(|l| l.trim_start().starts_with(".route(")) {
        let mut parts = line.splitn(3, '"');
        let (Some(_), Some(path), Some(handlers)) = (parts.next(), parts.next(), parts.next()) else {
            panic!("a route whose path is not on its line: {line}");
        };
        let methods: Vec<&str> = METHODS
            .into_iter()
            .filter(|m| handlers.contains(&format!(" {m}(")) || handlers.contains(&format!(".{m}(")))
            .collect();
        assert!(!methods.is_empty(), "a route whose methods are not on its line: {line}");
        operations.extend(methods.into_iter().map(|m| (path.to_owned(), m.to_owned())));
    }
    operations
}

fn documented_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            let methods = item.as_object().expect("a path item").keys().filter(|k| METHODS.contains(&k.as_str()));
            methods.map(move |m| (path.clone(), m.clone()))
        })
        .collect()
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(APP_ROOT).join(path)).expect("a file of the repo")
}

#[test]
fn the_document_names_every_route_of_the_router_and_nothing_else() {
    let routes = router_operations(&repo_file(ROUTER_PATH));
    assert!(routes.len() >= 9, "the router's routes were not found in {ROUTER_PATH}: {routes:?}");
    let doc: Value = serde_json::from_str(&repo_file(DOC_PATH)).expect("the document is JSON");
    assert_eq!(documented_operations(&doc), routes, "{DOC_PATH} and the router of {ROUTER_PATH} differ");
}

#[test]
fn every_operation_documents_its_refusals_as_problems() {
    let doc: Value = serde_json::from_str(&repo_file(DOC_PATH)).unwrap();
    let problem = "#/components/schemas/Problem";
    for (name, response) in doc["components"]["responses"].as_object().unwrap() {
        let schema = &response["content"]["application/problem+json"]["schema"]["$ref"];
        assert_eq!(schema, problem, "response {name}");
    }
    for (path, method) in documented_operations(&doc) {
        let responses = doc["paths"][&path][&method]["responses"].as_object().unwrap();
        for (status, response) in responses.iter().filter(|(s, _)| !s.starts_with('2')) {
            let inline = &response["content"]["application/problem+json"]["schema"]["$ref"];
            let shared = response["$ref"].as_str().is_some_and(|r| r.starts_with("#/components/responses/"));
            assert!(shared || inline == problem, "{method} {path} {status}: {response}");
        }
        let keyed = doc["paths"][&path][&method].get("security").is_none();
        assert_eq!(responses.contains_key("401"), keyed, "{method} {path}: 401 exactly where a key is needed");
    }
}

#[test]
fn the_stack_serves_the_document_kept_in_the_repo() {
    let data = tempfile::tempdir().unwrap();
    let s = Stack::start(StackOptions { scenario: "zero-latency", providers_url: None, data: data.path(), env: &[], extra_args: &[] });
    let r = s.get_raw("/api/openapi.json");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.text().unwrap(), repo_file(DOC_PATH));
}
