//! Three allocator replicas on a three-member etcd, through the real
//! binaries: clients spread over the replicas allocate and release owners
//! of one shared set while replicas and an etcd member are killed with
//! SIGKILL and started again. Every acknowledged write holds afterwards, on
//! every replica and in etcd's keys, and no address or owner is held twice.
//! A request whose caller gave up on one replica (its request timed out
//! there) and went on elsewhere is not applied after that. An owner key that
//! etcd holds without its allocation (put with `etcdctl`) does not keep its
//! owner from allocating.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Mutex, time::Instant};
use tonic::Status;
use vipam::{client::Client, v1::Allocation};
use vipam_e2e::{
    Allocator, allocator_metric,
    etcd::{self, DEFAULT_PREFIX, Keys, is_transient},
    mk_allocate, mk_client,
    syncer::wait_until,
};
use vipam_test_etcd::{Cluster, require, require_etcdctl};

const REPLICAS: usize = 3;
const CLIENTS: usize = 8;
const OWNERS: usize = 96;
/// Acknowledged writes between two faults.
const STEP: u64 = 60;
/// How long anything that must happen may take.
const WAIT: Duration = Duration::from_secs(30);
const POOL: &str = "default=10.80.0.0/23";

/// What the clients know of an owner: the last acknowledged write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum Known {
    #[default]
    Free,
    Held(String),
}

/// The shared owners, each behind a lock so that one write on an owner is
/// acknowledged before the next starts: then the last acknowledged write
/// is what must hold.
type Owners = Arc<Vec<Mutex<Known>>>;

fn owner_name(i: usize) -> String {
    format!("o/{i:02}")
}

/// A small deterministic generator, one per client.
struct Xorshift(u64);

impl Xorshift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Sends `call` to the replica `first`, then round the others, until one
/// answers other than transiently; whether an attempt failed before (its
/// outcome unknown) comes with the answer.
async fn until_answered<T, F, Fut>(
    clients: &[Client],
    first: usize,
    transient: &AtomicU64,
    mut call: F,
) -> (Result<T, Status>, bool)
where
    F: FnMut(Client) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + WAIT;
    let mut failed = false;
    let mut i = first;
    loop {
        match call(clients[i % clients.len()].clone()).await {
            Err(s) if is_transient(s.code()) && Instant::now() < deadline => {
                failed = true;
                transient.fetch_add(1, Ordering::Relaxed);
                i += 1;
                if (i - first).is_multiple_of(clients.len()) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            answer => return (answer, failed),
        }
    }
}

/// One client: picks owners of the shared set at random and allocates a
/// free one, releases a held one, or now and then allocates a held one
/// again (which must answer the address it holds).
async fn client(
    id: usize,
    clients: Vec<Client>,
    owners: Owners,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
    transient: Arc<AtomicU64>,
) {
    let mut random = Xorshift(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1));
    let prefer = id % clients.len();
    while !stop.load(Ordering::Relaxed) {
        let i = random.below(OWNERS);
        let owner = owner_name(i);
        let mut known = owners[i].lock().await;
        let again = random.below(4) == 0;
        match known.clone() {
            Known::Held(address) if !again => {
                let (answer, failed) = until_answered(&clients, prefer, &transient, |c| {
                    let owner = owner.clone();
                    async move { c.release_owner(&owner).await }
                })
                .await;
                match answer {
                    Ok(Some(a)) => assert_eq!(a.address, address, "{owner} held {address}"),
                    // An attempt cut off by a fault had released it.
                    Ok(None) => assert!(failed, "{owner} held {address}, release found nothing"),
                    Err(s) => panic!("release {owner}: {s:?}"),
                }
                *known = Known::Free;
            }
            held => {
                let (answer, _) = until_answered(&clients, prefer, &transient, |c| {
                    let owner = owner.clone();
                    async move { c.allocate(mk_allocate(&owner)).await }
                })
                .await;
                let a: Allocation = answer.unwrap_or_else(|s| panic!("allocate {owner}: {s:?}"));
                if let Known::Held(address) = held {
                    assert_eq!(a.address, address, "allocate {owner} again");
                }
                *known = Known::Held(a.address);
            }
        }
        acks.fetch_add(1, Ordering::Relaxed);
    }
}

/// Waits for `STEP` more acknowledged writes after `from`; the count then.
async fn step(acks: &AtomicU64, from: u64, during: &str) -> u64 {
    let deadline = Instant::now() + WAIT;
    let want = from + STEP;
    loop {
        let n = acks.load(Ordering::Relaxed);
        if n >= want {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{n} acknowledged writes, not {want}, within {WAIT:?} {during}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The allocations a replica lists, address → owner; panics when one is
/// listed twice or an owner holds two.
async fn listed(client: &Client) -> Result<BTreeMap<IpAddr, String>, Status> {
    let all = client.list_all("", "").await?;
    let mut by_address = BTreeMap::new();
    let mut owners = BTreeSet::new();
    for a in all {
        let address: IpAddr = a.address.parse().expect("address");
        assert!(owners.insert(a.owner.clone()), "{} listed twice", a.owner);
        assert!(
            by_address.insert(address, a.owner).is_none(),
            "{address} listed twice"
        );
    }
    Ok(by_address)
}

/// Waits until every replica lists exactly `want`.
async fn assert_every_replica_lists(
    clients: &[Client],
    replicas: &[Allocator],
    want: &BTreeMap<IpAddr, String>,
) {
    for (i, c) in clients.iter().enumerate() {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = listed(c).await;
            if got.as_ref().ok() == Some(want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} lists {got:?}, etcd holds {want:?}; its log:\n{}",
                replicas[i].log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_hold_across_sigkills_of_replicas_and_an_etcd_member() {
    let test = "acknowledged_writes_hold_across_sigkills_of_replicas_and_an_etcd_member";
    if require(test).is_none() {
        return;
    }
    let mut cluster = Cluster::start(3);
    let endpoints = cluster.endpoints();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut replicas: Vec<Option<Allocator>> = (0..REPLICAS)
        .map(|i| {
            let data = dir.path().join(format!("r{i}"));
            let args = ["--pool", POOL, "--etcd-timeout", "2s"];
            Some(etcd::start_replica(&data, &endpoints, &args).expect("replica"))
        })
        .collect();
    let clients: Vec<Client> = replicas
        .iter()
        .flatten()
        .map(|r| mk_client(&r.url(), None).expect("client"))
        .collect();

    let owners: Owners = Arc::new((0..OWNERS).map(|_| Mutex::default()).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicU64::new(0));
    let transient = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(client(
                id,
                clients.clone(),
                owners.clone(),
                stop.clone(),
                acks.clone(),
                transient.clone(),
            ))
        })
        .collect();

    let mut n = step(&acks, 0, "before any fault").await;
    for (victim, etcd_fault) in [(0, false), (1, true), (2, false)] {
        let mut replica = replicas[victim].take().expect("running");
        replica.kill().expect("SIGKILL a replica");
        n = step(&acks, n, &format!("with replica {victim} down")).await;
        let replica = tokio::task::block_in_place(|| replica.restart()).expect("restart");
        replicas[victim] = Some(replica);
        n = step(&acks, n, "after a replica restart").await;
        if etcd_fault {
            let leader = etcd::leader(&endpoints).await.expect("the etcd leader");
            cluster.kill(leader);
            n = step(&acks, n, &format!("with etcd member {leader} down")).await;
            tokio::task::block_in_place(|| cluster.restart(leader));
            n = step(&acks, n, "after an etcd member restart").await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("client task");
    }
    eprintln!(
        "{n} acknowledged writes or more, {} transient failures retried",
        transient.load(Ordering::Relaxed)
    );

    let replicas: Vec<Allocator> = replicas.into_iter().flatten().collect();
    let mut etcd = etcd::connect(&endpoints).await.expect("etcd");
    let keys = Keys::read(&mut etcd, DEFAULT_PREFIX).await.expect("keys");
    keys.check_agree().expect("address and owner keys agree");
    let mut expected = BTreeMap::new();
    for (i, known) in owners.iter().enumerate() {
        if let Known::Held(address) = &*known.lock().await {
            expected.insert(owner_name(i), address.parse::<IpAddr>().expect("address"));
        }
    }
    assert_eq!(
        keys.owners, expected,
        "etcd's owner keys are the acknowledged writes"
    );
    assert_every_replica_lists(&clients, &replicas, &keys.addresses).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_key_left_without_its_allocation_does_not_keep_its_owner_from_allocating() {
    let test = "an_owner_key_left_without_its_allocation_does_not_keep_its_owner_from_allocating";
    let Some(etcdctl) = require_etcdctl(test) else {
        return;
    };
    let cluster = Cluster::start(1);
    let endpoints = cluster.endpoints();
    let dir = tempfile::tempdir().expect("tempdir");
    let replica = etcd::start_replica(dir.path(), &endpoints, &["--pool", POOL]).expect("replica");
    let client = mk_client(&replica.url(), None).expect("client");
    // As a hand, an older version or a fault may leave it: the owner key
    // names an address whose key does not name the owner.
    let key = format!("{DEFAULT_PREFIX}o/tool/orphan");
    let put = std::process::Command::new(etcdctl)
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args(["put", &key, "10.80.0.9"])
        .output()
        .expect("run etcdctl");
    assert!(put.status.success(), "etcdctl put: {put:?}");

    let allocation = client
        .allocate(mk_allocate("tool/orphan"))
        .await
        .expect("allocate the owner of the orphaned key");
    let mut etcd = etcd::connect(&endpoints).await.expect("etcd");
    let keys = Keys::read(&mut etcd, DEFAULT_PREFIX).await.expect("keys");
    keys.check_agree().expect("address and owner keys agree");
    assert_eq!(
        keys.owners.get("tool/orphan").map(ToString::to_string),
        Some(allocation.address)
    );
    let log = replica.log();
    assert!(
        log.contains(&format!("deleted the owner key {key}")),
        "no warning naming the key:\n{log}"
    );
}

/// Sends Allocate for `owner` to `client` until it is answered other than
/// transiently, for up to [`WAIT`].
async fn allocate_until_answered(client: &Client, owner: &str) -> Allocation {
    let deadline = Instant::now() + WAIT;
    loop {
        match client.allocate(mk_allocate(owner)).await {
            Err(s) if is_transient(s.code()) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answer => return answer.unwrap_or_else(|s| panic!("allocate {owner}: {s:?}")),
        }
    }
}

// A replica whose etcd member hangs keeps requests queued behind the write
// it waits for; a caller that gives up on one of them and goes on with
// another replica must not find it applied later, over what it did since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_caller_gave_up_on_is_not_applied_after_the_caller_went_on() {
    let test = "a_request_its_caller_gave_up_on_is_not_applied_after_the_caller_went_on";
    if require(test).is_none() {
        return;
    }
    let cluster = Cluster::start(3);
    let endpoints = cluster.endpoints();
    let dir = tempfile::tempdir().expect("tempdir");
    // Replica a reaches member 0 only, which hangs below; b the others.
    let a_args = [
        "--pool",
        POOL,
        "--request-timeout",
        "1s",
        "--etcd-timeout",
        "3s",
    ];
    let a = etcd::start_replica(&dir.path().join("a"), &endpoints[..1], &a_args).expect("a");
    let b_args = ["--pool", POOL];
    let b = etcd::start_replica(&dir.path().join("b"), &endpoints[1..], &b_args).expect("b");
    let (on_a, on_b) = (
        mk_client(&a.url(), None).expect("client"),
        mk_client(&b.url(), None).expect("client"),
    );
    let owner = "tool/x";
    let first = on_a.allocate(mk_allocate(owner)).await.expect("allocate");

    cluster.freeze(0);
    // Replica a's writer waits for etcd with this one (up to --etcd-timeout,
    // after its caller gave up at --request-timeout)...
    let busy = on_a.allocate(mk_allocate("tool/busy")).await;
    assert!(busy.is_err(), "answered while etcd hangs: {busy:?}");
    // ...while this one waits in its queue, until its caller gives up.
    let gave_up = on_a
        .release_owner(owner)
        .await
        .expect_err("a release that timed out");
    assert!(is_transient(gave_up.code()), "{gave_up:?}");
    // The caller goes on with replica b.
    let released = on_b.release_owner(owner).await.expect("release on b");
    assert_eq!(released.map(|r| r.address), Some(first.address));
    let second = on_b
        .allocate(mk_allocate(owner))
        .await
        .expect("allocate on b");
    // Thawed once a's writer has given up on the write it waited for: what
    // it had queued meanwhile comes next.
    let a_http = a.addr;
    wait_until(
        WAIT,
        "replica a's write to the hung member failed",
        async || {
            let failed = allocator_metric(a_http, "vipam_store_unavailable", &[]).await?;
            Ok((failed >= 1.0).then_some(()))
        },
    )
    .await
    .expect("replica a gives up on etcd");
    cluster.thaw(0);
    // Replica a answers this one after whatever it had queued before.
    allocate_until_answered(&on_a, "tool/after").await;

    let mut etcd = etcd::connect(&endpoints).await.expect("etcd");
    let keys = Keys::read(&mut etcd, DEFAULT_PREFIX).await.expect("keys");
    keys.check_agree().expect("address and owner keys agree");
    assert_eq!(
        keys.owners.get(owner).map(ToString::to_string),
        Some(second.address),
        "the last acknowledged write of {owner}; replica a's log:\n{}",
        a.log()
    );
}
