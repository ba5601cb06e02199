//! The whole local host with a real handler process: the test binary itself,
//! re-run as a tiny custom handler (the ignored test `handler_process`).

use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::testkit::*;
use super::{LocalHost, LocalOptions};

const VARS: &[&str] = &[
    "FUNCTIONS_CUSTOMHANDLER_PORT",
    "FUNCTIONS_HTTPWORKER_PORT",
    "FUNCTIONS_CUSTOMHANDLER_WORKER_ID",
    "FUNCTIONS_APP_ROOT_PATH",
    "TICKETPAY_BUS_URL",
    "TICKETPAY_DATA_DIR",
    "TICKETPAY_PROVIDERS_URL",
    "TICKETPAY_PROVIDERS_CONFIG",
    "CUSTOM_SETTING",
];

/// Runs only when started by the host (the port variable is set).
#[tokio::test]
#[ignore]
async fn handler_process() {
    let Ok(port) = std::env::var("FUNCTIONS_CUSTOMHANDLER_PORT") else { return };
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/api/env",
            get(|| async {
                let mut m = serde_json::Map::new();
                for k in VARS {
                    m.insert(k.to_string(), json!(std::env::var(k).ok()));
                }
                m.insert("pid".into(), json!(std::process::id()));
                axum::Json(Value::Object(m))
            }),
        )
        .route(
            "/api/send",
            post(|body: String| async move {
                let bus = std::env::var("TICKETPAY_BUS_URL").unwrap();
                let r = reqwest::Client::new()
                    .post(format!("{bus}/ticket-lookup/messages"))
                    .header("BrokerProperties", json!({"MessageId": body}).to_string())
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                r.status().as_u16().to_string()
            }),
        )
        .route("/api/crash", post(|| async {
            std::process::exit(7);
            #[allow(unreachable_code)]
            ""
        }))
        .route(
            "/lookup",
            post(|body: axum::Json<Value>| async move {
                use base64::Engine;
                let data = base64::engine::general_purpose::STANDARD.decode(body["Data"]["message"].as_str().unwrap()).unwrap();
                let path = std::path::Path::new(&std::env::var("TICKETPAY_DATA_DIR").unwrap()).join("delivered.log");
                let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
                std::io::Write::write_all(&mut f, &[data, b"\n".to_vec()].concat()).unwrap();
                ok_json()
            }),
        );
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port.parse::<u16>().unwrap())).await.unwrap();
    axum::serve(l, app).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_host_runs_a_real_handler_process() {
    let app = app(&[("lookup", "ticket-lookup", false, 10)]);
    let me = std::env::current_exe().unwrap();
    let host = json!({
        "customHandler": {
            "description": {
                "defaultExecutablePath": me,
                "arguments": ["--exact", "host::e2e::handler_process", "--ignored", "--nocapture", "--test-threads=1", "--quiet"]
            },
            "enableProxyingHttpRequest": true
        }
    });
    std::fs::write(app.path().join("host.json"), host.to_string()).unwrap();
    std::fs::write(app.path().join("local.settings.json"), r#"{"IsEncrypted":false,"Values":{"CUSTOM_SETTING":"yes"}}"#).unwrap();
    let data = app.path().join("state");
    let h = LocalHost::start(LocalOptions {
        app_root: app.path().to_path_buf(),
        port: 0,
        providers_port: 0,
        providers_url: None,
        scenario: None,
        data: data.clone(),
    })
    .await
    .unwrap();
    let c = reqwest::Client::new();

    let env: Value = c.get(format!("{}/api/env", h.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(env["FUNCTIONS_CUSTOMHANDLER_PORT"], env["FUNCTIONS_HTTPWORKER_PORT"]);
    assert!(env["FUNCTIONS_CUSTOMHANDLER_WORKER_ID"].is_string());
    assert_eq!(env["FUNCTIONS_APP_ROOT_PATH"], json!(app.path().canonicalize().unwrap()));
    assert_eq!(env["TICKETPAY_BUS_URL"], json!(h.url));
    assert_eq!(env["TICKETPAY_DATA_DIR"], json!(data.canonicalize().unwrap()));
    assert_eq!(env["TICKETPAY_PROVIDERS_URL"], json!(h.providers_url));
    assert_eq!(env["TICKETPAY_PROVIDERS_CONFIG"], "realistic");
    assert_eq!(env["CUSTOM_SETTING"], "yes");

    // The handler sends through the host's Service Bus endpoint and gets the message delivered.
    let r = c.post(format!("{}/api/send", h.url)).body("hello").send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "201");
    let log = data.join("delivered.log");
    eventually("delivery", || std::fs::read_to_string(&log).is_ok_and(|s| s == "hello\n")).await;

    // A crashed handler is restarted.
    let first_pid = env["pid"].as_u64().unwrap();
    let _ = c.post(format!("{}/api/crash", h.url)).send().await;
    let mut restarted = None;
    for _ in 0..200 {
        if let Ok(r) = c.get(format!("{}/api/env", h.url)).send().await
            && r.status() == 200
        {
            let v: Value = r.json().await.unwrap();
            if v["pid"].as_u64() != Some(first_pid) {
                restarted = v["pid"].as_u64();
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = restarted.expect("handler restarted");
    let r = c.post(format!("{}/api/send", h.url)).body("again").send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "201");
    eventually("delivery after restart", || std::fs::read_to_string(&log).is_ok_and(|s| s == "hello\nagain\n")).await;

    h.shutdown().await.unwrap();
    // SAFETY: signal 0 only checks that the process exists.
    assert_ne!(unsafe { libc::kill(pid as i32, 0) }, 0, "handler stopped with the host");
}
