//! The OpenAPI document: served as it is kept in the repo, and describing
//! exactly the routes the API router has, method by method.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::common::*;
use crate::stack;

const DOC_PATH: &str = "src/api/openapi.json";
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// `(path, method)` for every route the API serves, the console's among them,
/// from the tables its routers are made from.
fn router_operations() -> BTreeSet<(String, String)> {
    ticketpay::api::ROUTES
        .iter()
        .chain(ticketpay::api::console::ROUTES)
        .flat_map(|(path, methods)| methods.iter().map(|m| (path.to_string(), m.to_string())))
        .collect()
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
    let routes = router_operations();
    let doc: Value = serde_json::from_str(&repo_file(DOC_PATH)).expect("the document is JSON");
    assert_eq!(documented_operations(&doc), routes, "{DOC_PATH} and the API's routers differ");
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
    let s = stack(data.path());
    let r = s.get_raw("/api/openapi.json");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.text().unwrap(), repo_file(DOC_PATH));
}
