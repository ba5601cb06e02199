//! `ticketpay package`: the deployment package the Functions host expects:
//! `host.json` at the root, one folder per function with its `function.json`,
//! and the Linux x86_64 `ticketpay` binary with its execute bit. Written as a
//! folder (what `azd` deploys) and as a zip beside it (for zip deploy).

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub struct PackageOptions {
    pub app_root: PathBuf,
    pub out: PathBuf,
    /// The binary to ship (default: this one).
    pub binary: Option<PathBuf>,
}

/// What was written.
pub struct Package {
    pub folder: PathBuf,
    pub zip: PathBuf,
    pub functions: Vec<String>,
}

/// Refuses anything but a Linux x86_64 executable: the Function App runs on that.
fn check_binary(path: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read the binary {}", path.display()))?;
    let is_elf = bytes.len() > 20 && &bytes[..4] == b"\x7fELF";
    let machine = if is_elf { u16::from_le_bytes([bytes[18], bytes[19]]) } else { 0 };
    if !is_elf || bytes[4] != 2 || machine != 0x3e {
        bail!("{} is not a Linux x86_64 executable; build one (cargo build --release --target x86_64-unknown-linux-gnu) and pass it with --binary", path.display());
    }
    Ok(bytes)
}

fn function_folders(app_root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let dir = app_root.join("functions");
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        let file = entry.path().join("function.json");
        if file.is_file() {
            let text = fs::read_to_string(&file)?;
            serde_json::from_str::<serde_json::Value>(&text).with_context(|| format!("{} is not valid JSON", file.display()))?;
            out.push((entry.file_name().to_string_lossy().into_owned(), file));
        }
    }
    out.sort();
    if out.is_empty() {
        bail!("no functions/*/function.json under {}", app_root.display());
    }
    Ok(out)
}

pub fn build(opts: &PackageOptions) -> Result<Package> {
    let host_json = opts.app_root.join("host.json");
    let host = fs::read(&host_json).with_context(|| format!("cannot read {}", host_json.display()))?;
    serde_json::from_slice::<serde_json::Value>(&host).with_context(|| format!("{} is not valid JSON", host_json.display()))?;
    let binary_path = match &opts.binary {
        Some(p) => p.clone(),
        None => std::env::current_exe()?,
    };
    let binary = check_binary(&binary_path)?;
    let functions = function_folders(&opts.app_root)?;

    let mut files: Vec<(String, Vec<u8>, u32)> = vec![("host.json".into(), host, 0o644)];
    for (name, path) in &functions {
        files.push((format!("{name}/function.json"), fs::read(path)?, 0o644));
    }
    files.push(("ticketpay".into(), binary, 0o755));

    if opts.out.exists() {
        fs::remove_dir_all(&opts.out).with_context(|| format!("cannot clear {}", opts.out.display()))?;
    }
    for (name, bytes, mode) in &files {
        let path = opts.out.join(name);
        fs::create_dir_all(path.parent().expect("a file in the package folder"))?;
        fs::write(&path, bytes)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
    }

    let zip_path = opts.out.with_extension("zip");
    let mut zip = zip::ZipWriter::new(fs::File::create(&zip_path).with_context(|| format!("cannot write {}", zip_path.display()))?);
    for (name, bytes, mode) in &files {
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(*mode);
        zip.start_file(name.as_str(), options)?;
        zip.write_all(bytes)?;
    }
    zip.finish()?;
    Ok(Package { folder: opts.out.clone(), zip: zip_path, functions: functions.into_iter().map(|(n, _)| n).collect() })
}
