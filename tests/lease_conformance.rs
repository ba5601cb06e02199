//! The lease contract, one suite for every implementation of the seam: who
//! holds a provider's capacity slice is decided by the service, a lease is
//! exclusive until it ends, renewed terms extend it, a released or expired
//! lease can be taken, and many contenders for one slice get one winner.

use std::sync::Arc;
use std::time::Duration;

use ticketpay::leases::sqlite::SqliteLeases;
use ticketpay::leases::{LeaseError, Leases, MIN_TERM};

const TERM: Duration = MIN_TERM;

async fn a_lease_is_exclusive_until_released(leases: Arc<dyn Leases>) {
    let mine = leases.acquire("gateway/0", "a", TERM).await.unwrap().expect("a free slice is taken");
    assert!(leases.acquire("gateway/0", "b", TERM).await.unwrap().is_none(), "a held slice is not taken again");
    assert!(leases.acquire("gateway/0", "a", TERM).await.unwrap().is_none(), "not even by its holder: it renews instead");
    let other = leases.acquire("gateway/1", "b", TERM).await.unwrap().expect("another slice is free");
    assert_ne!(mine, other);
    assert_eq!(
        leases.holders("gateway/").await.unwrap(),
        vec![("gateway/0".to_owned(), "a".to_owned()), ("gateway/1".to_owned(), "b".to_owned())]
    );
    assert!(leases.holders("fraud/").await.unwrap().is_empty(), "holders are listed by prefix");

    leases.release("gateway/0", &mine).await.unwrap();
    leases.release("gateway/0", &mine).await.unwrap();
    assert!(!leases.renew("gateway/0", &mine, TERM).await.unwrap(), "a released lease cannot be renewed");
    let taken = leases.acquire("gateway/0", "b", TERM).await.unwrap().expect("a released slice is free");
    leases.release("gateway/0", &mine).await.unwrap();
    assert_eq!(leases.holders("gateway/0").await.unwrap(), vec![("gateway/0".to_owned(), "b".to_owned())], "releasing an old lease frees nothing");
    assert!(leases.renew("gateway/0", &taken, TERM).await.unwrap());
}

async fn terms_are_those_azure_storage_allows(leases: Arc<dyn Leases>) {
    for term in [Duration::from_secs(5), Duration::from_secs(61)] {
        assert!(matches!(leases.acquire("ledger/0", "a", term).await, Err(LeaseError::Term(_))), "{term:?}");
    }
    assert!(leases.acquire("ledger/0", "a", Duration::from_secs(60)).await.unwrap().is_some());
}

/// One term is 15 s: this test waits for one to end.
async fn a_lease_not_renewed_expires_and_a_renewed_one_does_not(leases: Arc<dyn Leases>) {
    let lapsing = leases.acquire("receipt/0", "crashed", TERM).await.unwrap().unwrap();
    let kept = leases.acquire("receipt/1", "alive", TERM).await.unwrap().unwrap();
    let started = tokio::time::Instant::now();
    while started.elapsed() < TERM + Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(leases.renew("receipt/1", &kept, TERM).await.unwrap(), "a renewed lease stays held");
        assert!(leases.acquire("receipt/1", "b", TERM).await.unwrap().is_none());
    }
    let taken = leases.acquire("receipt/0", "b", TERM).await.unwrap().expect("an expired lease can be taken");
    assert!(!leases.renew("receipt/0", &lapsing, TERM).await.unwrap(), "a lease taken over is lost to its old holder");
    assert_eq!(leases.holders("receipt/").await.unwrap().len(), 2);
    leases.release("receipt/0", &taken).await.unwrap();
}

async fn many_contenders_get_one_winner_per_slice(leases: Arc<dyn Leases>) {
    let takes = (0..16).map(|i| {
        let leases = leases.clone();
        tokio::spawn(async move { leases.acquire("settlement/3", &format!("i{i}"), TERM).await.unwrap() })
    });
    let won = futures::future::join_all(takes).await.into_iter().filter(|r| r.as_ref().unwrap().is_some()).count();
    assert_eq!(won, 1, "sixteen instances race for one slice: one gets it");
}

async fn members_and_pauses_are_shared(leases: Arc<dyn Leases>) {
    assert_eq!(leases.announce("gateway", "a", 7, TERM).await.unwrap().len(), 1);
    let seen = leases.announce("gateway", "b", 0, TERM).await.unwrap();
    let wants: Vec<(String, u32)> = seen.iter().map(|m| (m.instance.clone(), m.wants)).collect();
    assert_eq!(wants, vec![("a".to_owned(), 7), ("b".to_owned(), 0)]);
    let seen = leases.announce("gateway", "a", 20, TERM).await.unwrap();
    assert_eq!(seen[0].wants, 20, "a member's demand is what it said last");
    assert_eq!(leases.announce("fraud", "a", 1, TERM).await.unwrap().len(), 1, "groups are apart");
    leases.leave("gateway", "a").await.unwrap();
    assert_eq!(leases.announce("gateway", "b", 3, TERM).await.unwrap().len(), 1, "a member that left is gone");

    assert_eq!(leases.paused_until("gateway").await.unwrap(), None);
    leases.pause("gateway", Duration::from_secs(2)).await.unwrap();
    leases.pause("gateway", Duration::from_millis(500)).await.unwrap();
    let until = leases.paused_until("gateway").await.unwrap().expect("paused");
    let left = until - chrono::Utc::now();
    assert!(left > chrono::Duration::milliseconds(1_500), "the later end wins: {left}");
    assert_eq!(leases.paused_until("fraud").await.unwrap(), None, "one provider's pause is its own");
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(leases.paused_until("gateway").await.unwrap(), None, "a pause ends");
}

macro_rules! conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;

            async fn leases() -> (Arc<dyn Leases>, Box<dyn std::any::Any>) {
                $make
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_lease_is_exclusive_until_released() { let (l, _keep) = leases().await; super::a_lease_is_exclusive_until_released(l).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn terms_are_those_azure_storage_allows() { let (l, _keep) = leases().await; super::terms_are_those_azure_storage_allows(l).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_lease_not_renewed_expires_and_a_renewed_one_does_not() { let (l, _keep) = leases().await; super::a_lease_not_renewed_expires_and_a_renewed_one_does_not(l).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn many_contenders_get_one_winner_per_slice() { let (l, _keep) = leases().await; super::many_contenders_get_one_winner_per_slice(l).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn members_and_pauses_are_shared() { let (l, _keep) = leases().await; super::members_and_pauses_are_shared(l).await }
        }
    };
}

conformance!(sqlite, {
    let dir = tempfile::tempdir().unwrap();
    let leases = SqliteLeases::open(&dir.path().join("leases.db")).unwrap();
    (Arc::new(leases) as Arc<dyn Leases>, Box::new(dir) as Box<dyn std::any::Any>)
});

// Azure Storage blob leases, on the storage emulator (Azurite): one per test, a fresh container.
conformance!(azurite, {
    let azurite = emulator::Azurite::start();
    let leases = azurite.leases();
    leases.create_container_if_missing().await.unwrap();
    (Arc::new(leases) as Arc<dyn Leases>, Box::new(azurite) as Box<dyn std::any::Any>)
});

// Two processes sharing a data folder are two connections to one file.
conformance!(sqlite_two_connections, {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    let (one, two) = (SqliteLeases::open(&path).unwrap(), SqliteLeases::open(&path).unwrap());
    (Arc::new(Split { one, two }) as Arc<dyn Leases>, Box::new(dir) as Box<dyn std::any::Any>)
});

/// Takes through one connection and everything else through the other.
struct Split {
    one: SqliteLeases,
    two: SqliteLeases,
}

#[async_trait::async_trait]
impl Leases for Split {
    async fn acquire(&self, r: &str, i: &str, t: Duration) -> ticketpay::leases::Result<Option<ticketpay::leases::LeaseId>> {
        self.one.acquire(r, i, t).await
    }
    async fn renew(&self, r: &str, l: &ticketpay::leases::LeaseId, t: Duration) -> ticketpay::leases::Result<bool> {
        self.two.renew(r, l, t).await
    }
    async fn release(&self, r: &str, l: &ticketpay::leases::LeaseId) -> ticketpay::leases::Result<()> {
        self.two.release(r, l).await
    }
    async fn holders(&self, p: &str) -> ticketpay::leases::Result<Vec<(String, String)>> {
        self.two.holders(p).await
    }
    async fn announce(&self, g: &str, i: &str, w: u32, t: Duration) -> ticketpay::leases::Result<Vec<ticketpay::leases::Member>> {
        self.two.announce(g, i, w, t).await
    }
    async fn leave(&self, g: &str, i: &str) -> ticketpay::leases::Result<()> {
        self.one.leave(g, i).await
    }
    async fn pause(&self, r: &str, f: Duration) -> ticketpay::leases::Result<()> {
        self.one.pause(r, f).await
    }
    async fn paused_until(&self, r: &str) -> ticketpay::leases::Result<Option<chrono::DateTime<chrono::Utc>>> {
        self.two.paused_until(r).await
    }
}

mod emulator {
    //! Azurite, the Azure Storage emulator (npm `azurite`, found on PATH), with
    //! its blob service only, in a temporary folder, on a free port; stopped on drop.

    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use base64::Engine as _;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;
    use ticketpay::leases::blob::BlobLeases;

    /// Azurite's well-known development account (documented, for tests only).
    const ACCOUNT: &str = "devstoreaccount1";
    const KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    pub struct Azurite {
        child: Child,
        port: u16,
        _dir: tempfile::TempDir,
    }

    impl Azurite {
        pub fn start() -> Azurite {
            let program = find("azurite-blob").unwrap_or_else(|| {
                panic!("azurite-blob is not on PATH: install the Azure Storage emulator with `npm install -g azurite@3` (.ci/run does)")
            });
            let dir = tempfile::tempdir().unwrap();
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let child = Command::new(&program)
                .args(["--silent", "--disableTelemetry", "--skipApiVersionCheck", "--loose", "--blobHost", "127.0.0.1"])
                .arg("--blobPort")
                .arg(port.to_string())
                .arg("--location")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
            let mut azurite = Azurite { child, port, _dir: dir };
            let started = Instant::now();
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Some(status) = azurite.child.try_wait().unwrap() {
                    panic!("Azurite exited before listening on port {port}: {status}");
                }
                assert!(started.elapsed() < Duration::from_secs(60), "Azurite did not listen on port {port} within 60 s");
                std::thread::sleep(Duration::from_millis(50));
            }
            azurite
        }

        /// Leases on a fresh container, with an account SAS signed by the well-known key.
        pub fn leases(&self) -> BlobLeases {
            let container = format!("t{}", uuid::Uuid::new_v4().simple());
            BlobLeases::with_sas(&format!("http://127.0.0.1:{}/{ACCOUNT}", self.port), &container, &account_sas()).unwrap()
        }
    }

    impl Drop for Azurite {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn find(program: &str) -> Option<std::path::PathBuf> {
        std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(program)).find(|p| p.is_file())
    }

    /// An account SAS for the blob service (version 2020-12-06 and later string to sign).
    fn account_sas() -> String {
        let (sp, ss, srt, sv) = ("rwdlacup", "b", "sco", "2021-08-06");
        let se = (chrono::Utc::now() + chrono::Duration::hours(4)).format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let to_sign = format!("{ACCOUNT}\n{sp}\n{ss}\n{srt}\n\n{se}\n\n\n{sv}\n\n");
        let key = base64::engine::general_purpose::STANDARD.decode(KEY).unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(to_sign.as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let enc = |v: &str| percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string();
        format!("sv={sv}&ss={ss}&srt={srt}&sp={sp}&se={}&sig={}", enc(&se), enc(&sig))
    }
}
