//! The custom-handler process: started as the Functions host starts it, its
//! output forwarded to ours, polled for readiness, restarted (with backoff)
//! when it exits, and killed with us even if we are killed with SIGKILL.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// What the dispatcher and the proxy need to know about the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerState {
    Starting,
    Ready,
    /// Exited or failed to start; being restarted unless we are stopping.
    Down(String),
    Stopped,
}

#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    pub port: u16,
}

pub struct Worker {
    state: watch::Receiver<WorkerState>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// How long the handler gets to answer its first request.
pub const READY_LIMIT: Duration = Duration::from_secs(30);

impl Worker {
    /// Starts supervising; `state` is the sender the rest of the host watches.
    pub fn start(spec: WorkerSpec, state: watch::Sender<WorkerState>) -> Worker {
        Worker::start_with_pid(spec, state, Arc::default())
    }

    /// As [`Worker::start`]; `pid` holds the running handler's process id (0 while none).
    pub fn start_with_pid(spec: WorkerSpec, state: watch::Sender<WorkerState>, pid: Arc<AtomicI32>) -> Worker {
        let rx = state.subscribe();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(supervise(spec, state, stop_rx, pid));
        Worker { state: rx, stop, task }
    }

    /// Waits for the first readiness; fails if the handler exits first or
    /// does not answer within [`READY_LIMIT`].
    pub async fn wait_ready(&self) -> Result<()> {
        let mut rx = self.state.clone();
        let wait = rx.wait_for(|s| !matches!(s, WorkerState::Starting));
        match tokio::time::timeout(READY_LIMIT + Duration::from_secs(1), wait).await {
            Err(_) => bail!("the handler did not answer GET / within {READY_LIMIT:?}"),
            Ok(Err(_)) => bail!("the handler supervisor stopped"),
            Ok(Ok(s)) => match &*s {
                WorkerState::Ready => Ok(()),
                WorkerState::Down(why) => bail!("the handler did not start: {why}"),
                other => bail!("the handler did not start ({other:?})"),
            },
        }
    }

    /// Stops the handler: SIGTERM, then SIGKILL after a short grace period.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Resolves `defaultExecutablePath` as the host does: relative to the app
/// root; else, when it names this very program, the running executable; else
/// on PATH.
pub fn resolve_executable(app_root: &Path, name: &str) -> Result<PathBuf> {
    let direct = app_root.join(name);
    if direct.is_file() {
        return Ok(direct);
    }
    if let Ok(me) = std::env::current_exe()
        && Path::new(name).file_name().is_some_and(|f| Some(f) == me.file_name())
    {
        return Ok(me);
    }
    if !name.contains('/')
        && let Some(path) = std::env::var_os("PATH")
    {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(anyhow!(
        "{}: customHandler.description.defaultExecutablePath {name:?} was not found in {} nor on PATH",
        app_root.join("host.json").display(),
        app_root.display()
    ))
}

/// Replaces `%NAME%` with the setting's value (left as-is when unknown).
pub fn expand(arg: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find('%') {
        let after = &rest[start + 1..];
        match after.find('%') {
            Some(end) if end > 0 && lookup(&after[..end]).is_some() => {
                out.push_str(&rest[..start]);
                out.push_str(&lookup(&after[..end]).unwrap_or_default());
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str(&rest[..start + 1]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

struct Running {
    pid: libc::pid_t,
    exit: oneshot::Receiver<std::io::Result<ExitStatus>>,
}

/// Spawns the child on a thread of its own that lives exactly as long as the
/// child: PR_SET_PDEATHSIG fires when the spawning *thread* ends, so it must
/// not be a pooled thread.
async fn spawn(spec: &WorkerSpec) -> Result<Running> {
    let (started_tx, started_rx) = oneshot::channel::<std::io::Result<libc::pid_t>>();
    let (exit_tx, exit_rx) = oneshot::channel();
    let program = spec.program.clone();
    let spec = spec.clone();
    std::thread::Builder::new().name("handler-process".into()).spawn(move || {
        let mut cmd = std::process::Command::new(&spec.program);
        cmd.args(&spec.args)
            .current_dir(&spec.cwd)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("the host exited while starting the handler"));
                }
                Ok(())
            });
        }
        match cmd.spawn() {
            Err(e) => {
                let _ = started_tx.send(Err(e));
            }
            Ok(mut child) => {
                if let Some(out) = child.stdout.take() {
                    forward_lines(out, false);
                }
                if let Some(err) = child.stderr.take() {
                    forward_lines(err, true);
                }
                let _ = started_tx.send(Ok(child.id() as libc::pid_t));
                let _ = exit_tx.send(child.wait());
            }
        }
    })?;
    let pid = started_rx
        .await
        .map_err(|_| anyhow!("the handler-process thread ended"))?
        .map_err(|e| anyhow!("cannot start {}: {e}", program.display()))?;
    Ok(Running { pid, exit: exit_rx })
}

fn forward_lines(r: impl std::io::Read + Send + 'static, stderr: bool) {
    let _ = std::thread::Builder::new().name("handler-output".into()).spawn(move || {
        for line in BufReader::new(r).split(b'\n') {
            let Ok(mut line) = line else { break };
            line.push(b'\n');
            let _ = if stderr {
                std::io::stderr().lock().write_all(&line)
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(&line).and_then(|_| out.flush())
            };
        }
    });
}

async fn answers(client: &reqwest::Client, port: u16) -> bool {
    client.get(format!("http://127.0.0.1:{port}/")).send().await.is_ok()
}

async fn supervise(
    spec: WorkerSpec,
    state: watch::Sender<WorkerState>,
    mut stop: watch::Receiver<bool>,
    pid: Arc<AtomicI32>,
) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("http client");
    let mut backoff = Duration::from_millis(250);
    loop {
        if *stop.borrow() {
            break;
        }
        let started = Instant::now();
        let why = match spawn(&spec).await {
            Err(e) => format!("{e:#}"),
            Ok(mut child) => {
                pid.store(child.pid, Ordering::Relaxed);
                let _ = state.send(WorkerState::Starting);
                // Readiness: any HTTP answer to GET /.
                let mut outcome = None;
                let deadline = Instant::now() + READY_LIMIT;
                while outcome.is_none() {
                    if answers(&client, spec.port).await {
                        let _ = state.send(WorkerState::Ready);
                        tracing::info!("handler ready on port {} (pid {})", spec.port, child.pid);
                        break;
                    }
                    if Instant::now() > deadline {
                        outcome = Some(format!("did not answer GET / within {READY_LIMIT:?}"));
                        terminate(&mut child).await;
                        break;
                    }
                    tokio::select! {
                        r = &mut child.exit => outcome = Some(exit_text(r)),
                        _ = stop.changed() => { terminate(&mut child).await; outcome = Some("stopped".into()); }
                        _ = tokio::time::sleep(Duration::from_millis(25)) => {}
                    }
                }
                match outcome {
                    Some(why) => why,
                    None => tokio::select! {
                        r = &mut child.exit => exit_text(r),
                        _ = stop.changed() => { terminate(&mut child).await; "stopped".into() }
                    },
                }
            }
        };
        pid.store(0, Ordering::Relaxed);
        if *stop.borrow() {
            break;
        }
        let _ = state.send(WorkerState::Down(why.clone()));
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(250);
        }
        tracing::warn!("handler {why}; restarting in {backoff:?}");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    let _ = state.send(WorkerState::Stopped);
}

fn exit_text(r: Result<std::io::Result<ExitStatus>, oneshot::error::RecvError>) -> String {
    match r {
        Ok(Ok(s)) => format!("exited ({s})"),
        Ok(Err(e)) => format!("could not be waited for: {e}"),
        Err(_) => "exited".into(),
    }
}

/// SIGTERM, up to 3 s to exit, then SIGKILL.
async fn terminate(child: &mut Running) {
    // SAFETY: plain syscall on our own, not yet reaped, child.
    unsafe { libc::kill(child.pid, libc::SIGTERM) };
    if tokio::time::timeout(Duration::from_secs(3), &mut child.exit).await.is_err() {
        unsafe { libc::kill(child.pid, libc::SIGKILL) };
        let _ = (&mut child.exit).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_settings() {
        let lookup = |k: &str| (k == "PORT").then(|| "7071".to_string());
        assert_eq!(expand("--port=%PORT%", lookup), "--port=7071");
        assert_eq!(expand("100%", lookup), "100%");
        assert_eq!(expand("%UNKNOWN%-%PORT%", lookup), "%UNKNOWN%-7071");
    }

    #[test]
    fn resolves_on_path() {
        let d = tempfile::tempdir().unwrap();
        assert!(resolve_executable(d.path(), "sh").unwrap().ends_with("sh"));
        let e = resolve_executable(d.path(), "no-such-program-here").unwrap_err().to_string();
        assert!(e.contains("defaultExecutablePath") && e.contains("no-such-program-here"), "{e}");
    }

    #[tokio::test]
    async fn a_handler_that_exits_fails_startup_with_the_reason() {
        let spec = WorkerSpec {
            program: "sh".into(),
            args: vec!["-c".into(), "echo starting; exit 3".into()],
            cwd: std::env::temp_dir(),
            env: vec![],
            port: free_port(),
        };
        let (tx, _rx) = watch::channel(WorkerState::Starting);
        let w = Worker::start(spec, tx);
        let e = w.wait_ready().await.unwrap_err().to_string();
        assert!(e.contains("exit status: 3"), "{e}");
        w.stop().await;
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }
}
