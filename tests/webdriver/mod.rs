//! Headless Chromium driven through chromedriver with the W3C WebDriver
//! protocol over plain HTTP. Dropping the browser ends its session and kills
//! chromedriver with every browser process it started, whatever happened.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::Method;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The key under which WebDriver names an element.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver in its own process group, so one signal also reaches the browsers it started.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        Driver { child, url: format!("http://127.0.0.1:{port}") }
    }

    fn wait_ready(&self, http: &reqwest::blocking::Client) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = http.get(format!("{}/status", self.url)).send().ok().and_then(|r| r.json::<Value>().ok());
            if status.is_some_and(|s| s["value"]["ready"] == true) {
                return;
            }
            assert!(Instant::now() < deadline, "chromedriver not ready within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        unsafe {
            libc::killpg(self.child.id() as i32, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

pub struct Browser {
    http: reqwest::blocking::Client,
    session: String,
    // Dropped after the session is deleted: chromedriver, then the browser's profile.
    _driver: Driver,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn start() -> Browser {
        for path in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: install the Debian packages `chromium chromium-driver` (apt-get install -y chromium chromium-driver)"
            );
        }
        let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let driver = Driver::start();
        driver.wait_ready(&http);
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-background-networking".to_owned(),
            "--no-first-run".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
            "--window-size=1280,1000".to_owned(),
            "--disable-quic".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let created = command(&http, Method::POST, &format!("{}/session", driver.url), capabilities)
            .unwrap_or_else(|e| panic!("no browser session: {e}"));
        let id = created["sessionId"].as_str().expect("a session id");
        Browser { session: format!("{}/session/{id}", driver.url), http, _driver: driver, _profile: profile }
    }

    fn call(&self, method: Method, path: &str, body: Value) -> Result<Value, String> {
        command(&self.http, method, &format!("{}{path}", self.session), body)
    }

    fn must(&self, method: Method, path: &str, body: Value) -> Value {
        self.call(method, path, body).unwrap_or_else(|e| panic!("WebDriver {path}: {e}"))
    }

    pub fn goto(&self, url: &str) {
        self.must(Method::POST, "/url", json!({ "url": url }));
    }

    pub fn url(&self) -> String {
        self.must(Method::GET, "/url", Value::Null).as_str().unwrap_or_default().to_owned()
    }

    pub fn execute(&self, script: &str) -> Value {
        self.must(Method::POST, "/execute/sync", json!({ "script": script, "args": [] }))
    }

    fn find(&self, css: &str) -> Result<String, String> {
        let found = self.call(Method::POST, "/element", json!({ "using": "css selector", "value": css }))?;
        Ok(found[ELEMENT].as_str().expect("an element reference").to_owned())
    }

    pub fn count(&self, css: &str) -> usize {
        let found = self.must(Method::POST, "/elements", json!({ "using": "css selector", "value": css }));
        found.as_array().map_or(0, Vec::len)
    }

    fn try_text(&self, css: &str) -> Result<String, String> {
        let element = self.find(css)?;
        let text = self.call(Method::GET, &format!("/element/{element}/text"), Value::Null)?;
        Ok(text.as_str().unwrap_or_default().to_owned())
    }

    /// The rendered text of the first element matching `css`, once it is there.
    pub fn text(&self, css: &str) -> String {
        self.wait_text(css, |_| true, Duration::from_secs(10))
    }

    /// Waits until the first element matching `css` shows a text `accept` takes;
    /// the page re-renders as it polls, so a vanished element is looked up again.
    pub fn wait_text(&self, css: &str, accept: impl Fn(&str) -> bool, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let text = self.try_text(css);
            if let Ok(t) = &text
                && accept(t)
            {
                return t.clone();
            }
            assert!(Instant::now() < deadline, "`{css}` not as expected within {within:?}: {text:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn wait_count(&self, css: &str, expected: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.count(css) != expected {
            assert!(Instant::now() < deadline, "not {expected} of `{css}` within {within:?}: {}", self.count(css));
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn displayed(&self, css: &str) -> bool {
        let element = self.find(css).unwrap_or_else(|e| panic!("`{css}`: {e}"));
        self.must(Method::GET, &format!("/element/{element}/displayed"), Value::Null) == true
    }

    pub fn click(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let clicked = self.find(css).and_then(|e| self.call(Method::POST, &format!("/element/{e}/click"), json!({})));
            match clicked {
                Ok(_) => return,
                Err(e) => assert!(Instant::now() < deadline, "cannot click `{css}`: {e}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).unwrap_or_else(|e| panic!("`{css}`: {e}"));
        self.must(Method::POST, &format!("/element/{element}/value"), json!({ "text": text }));
    }

    pub fn screenshot(&self, path: &Path) {
        let png = self.must(Method::GET, "/screenshot", Value::Null);
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().expect("base64 PNG")).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.http.delete(&self.session).timeout(Duration::from_secs(10)).send();
    }
}

/// One WebDriver command: its `value`, or the error it names.
fn command(http: &reqwest::blocking::Client, method: Method, url: &str, body: Value) -> Result<Value, String> {
    let mut request = http.request(method.clone(), url);
    if method == Method::POST {
        request = request.json(&body);
    }
    let response = request.send().map_err(|e| e.to_string())?;
    let ok = response.status().is_success();
    let mut answer: Value = response.json().map_err(|e| e.to_string())?;
    let value = answer["value"].take();
    if ok {
        Ok(value)
    } else {
        Err(format!("{}: {}", value["error"].as_str().unwrap_or("error"), value["message"].as_str().unwrap_or_default()))
    }
}
