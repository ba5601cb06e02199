//! The deployment package, unpacked and checked as the Functions host will read it.

use std::collections::BTreeSet;
use std::io::Read;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ticketpay");
const APP_ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn the_package_holds_host_json_every_function_and_an_executable_binary() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("package");
    let status = Command::new(BIN).args(["package", "--out", out.to_str().unwrap(), "--app-root", APP_ROOT]).status().unwrap();
    assert!(status.success());

    let file = std::fs::File::open(dir.path().join("package.zip")).unwrap();
    let mut zip = zip::ZipArchive::new(file).unwrap();
    let names: BTreeSet<String> = zip.file_names().map(|n| n.unwrap().into_owned()).collect();

    let mut expected = BTreeSet::from(["host.json".to_owned(), "ticketpay".to_owned()]);
    for entry in std::fs::read_dir(format!("{APP_ROOT}/functions")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        expected.insert(format!("{name}/function.json"));
    }
    assert_eq!(names, expected, "host.json at the root, one folder per function, the binary");

    let read = |zip: &mut zip::ZipArchive<std::fs::File>, name: &str| {
        let mut text = String::new();
        zip.by_name(name).unwrap().read_to_string(&mut text).unwrap();
        text
    };
    assert_eq!(read(&mut zip, "host.json"), std::fs::read_to_string(format!("{APP_ROOT}/host.json")).unwrap());
    let host: serde_json::Value = serde_json::from_str(&read(&mut zip, "host.json")).unwrap();
    assert_eq!(host["customHandler"]["description"]["defaultExecutablePath"], "ticketpay", "the host finds the binary at the root");

    let mut queues = BTreeSet::new();
    for name in expected.iter().filter(|n| n.ends_with("/function.json")) {
        let packaged: serde_json::Value = serde_json::from_str(&read(&mut zip, name)).unwrap();
        let source: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{APP_ROOT}/functions/{name}")).unwrap()).unwrap();
        assert_eq!(packaged, source, "{name}");
        if let Some(q) = packaged["bindings"][0]["queueName"].as_str() {
            queues.insert(q.to_owned());
        }
    }
    assert_eq!(
        queues,
        ["ticket-lookup", "ticket-notify", "ticket-pay", "ticket-reserve", "ticket-validate"].map(String::from).into(),
        "every stage's trigger queue is in the package"
    );

    let binary = zip.by_name("ticketpay").unwrap();
    assert_eq!(binary.unix_mode().unwrap() & 0o777, 0o755, "the binary keeps its execute bit");
    drop(binary);
    let unpacked = out.join("ticketpay");
    let version = Command::new(&unpacked).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("ticketpay"), "the packaged binary runs");
}

#[test]
fn a_binary_for_another_platform_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("not-linux.exe");
    std::fs::write(&fake, b"MZ\x90\x00 a windows program").unwrap();
    let out = Command::new(BIN)
        .args(["package", "--out", dir.path().join("p").to_str().unwrap(), "--app-root", APP_ROOT, "--binary", fake.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not-linux.exe") && stderr.contains("Linux x86_64"), "{stderr}");
    assert!(!dir.path().join("p.zip").exists(), "nothing half-written");
}
