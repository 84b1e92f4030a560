//! SIGKILL the real allocator again and again, in the middle of concurrent
//! Allocates and Releases and right after their answers: after every restart
//! each acknowledged write is there, and no address or owner is held twice.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tonic::transport::Channel;
use vipam::v1::{AllocateRequest, ListRequest, ReleaseRequest, allocator_client::AllocatorClient};
use vipam_e2e::Allocator;

const ROUNDS: usize = 5;
const CLIENTS: usize = 16;
const ACKS_PER_ROUND: u64 = 300;

/// What clients know of an owner.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Known {
    /// Allocate acknowledged with this address.
    Held(String),
    /// Release acknowledged.
    Released,
    /// A request was in flight when the server died: either outcome is fine.
    Unsure,
}

async fn client_loop(
    mut c: AllocatorClient<Channel>,
    id: usize,
    known: Arc<Mutex<HashMap<String, Known>>>,
    acks: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        // Every third step releases this client's previous owner.
        let (owner, release) = if n.is_multiple_of(3) {
            (format!("c{id}-{}", n - 1), true)
        } else {
            (format!("c{id}-{n}"), false)
        };
        if known.lock().expect("lock").get(&owner) == Some(&Known::Unsure) {
            continue;
        }
        let result = if release {
            c.release(ReleaseRequest {
                owner: owner.clone(),
                ..Default::default()
            })
            .await
            .map(|_| Known::Released)
        } else {
            c.allocate(AllocateRequest {
                owner: owner.clone(),
                ..Default::default()
            })
            .await
            .map(|r| Known::Held(r.into_inner().address))
        };
        match result {
            Ok(k) => {
                known.lock().expect("lock").insert(owner, k);
                acks.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                known.lock().expect("lock").insert(owner, Known::Unsure);
                return;
            }
        }
    }
}

async fn list_all(c: &mut AllocatorClient<Channel>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list(ListRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        out.extend(page.allocations.into_iter().map(|a| (a.address, a.owner)));
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_concurrent_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut allocator =
        Allocator::start(dir.path(), &["--pool", "default=10.20.0.0/16"]).expect("start");
    let known: Arc<Mutex<HashMap<String, Known>>> = Arc::default();
    for round in 0..ROUNDS {
        let acks = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let base = allocator.client().await.expect("connect");
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|i| {
                tokio::spawn(client_loop(
                    base.clone(),
                    round * 1000 + i,
                    known.clone(),
                    acks.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        // Kill once the clients are well into their writes.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while acks.load(Ordering::Relaxed) < ACKS_PER_ROUND {
            assert!(
                tokio::time::Instant::now() < deadline,
                "clients made no progress:\n{}",
                allocator.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if round % 2 == 0 {
            // Mid-traffic: requests in flight die with the process.
            allocator.kill().expect("SIGKILL");
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                t.await.expect("client task");
            }
        } else {
            // Right after the last answers: the newest acknowledged writes
            // are the ones a missing flush would lose.
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                t.await.expect("client task");
            }
            allocator.kill().expect("SIGKILL");
        }

        allocator = allocator.restart().expect("restart after SIGKILL");
        let mut c = allocator.client().await.expect("connect");
        let listed = list_all(&mut c).await;
        let by_owner: BTreeMap<&str, &str> = listed
            .iter()
            .map(|(a, o)| (o.as_str(), a.as_str()))
            .collect();
        let addresses: BTreeSet<&str> = listed.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(by_owner.len(), listed.len(), "an owner holds two addresses");
        assert_eq!(addresses.len(), listed.len(), "an address is listed twice");
        let known = known.lock().expect("lock");
        for (owner, k) in known.iter() {
            match k {
                Known::Held(addr) => assert_eq!(
                    by_owner.get(owner.as_str()),
                    Some(&addr.as_str()),
                    "round {round}: acknowledged {owner} → {addr} lost"
                ),
                Known::Released => assert_eq!(
                    by_owner.get(owner.as_str()),
                    None,
                    "round {round}: acknowledged release of {owner} lost"
                ),
                Known::Unsure => {}
            }
        }
        for owner in by_owner.keys() {
            assert!(
                known.contains_key(*owner),
                "round {round}: {owner} allocated but never requested"
            );
        }
    }
}
