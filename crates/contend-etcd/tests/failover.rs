//! The etcd lock when members die, on a 3-member cluster of its own (temporary folder, free
//! ports; never the shared one): with 1 of 3 down it still works, with 2 of 3 down it refuses
//! within a bounded time and the holder of a lock learns that it lost it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use contend_etcd::EtcdLocks;
use contend_test_support::skip_or_fail;

struct Member {
    url: String,
    child: Child,
}

struct Cluster {
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            let _ = m.child.kill();
            let _ = m.child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts 3 members on free ports and waits until the cluster answers; `None` (skipped) when
/// the `etcd` binary is missing.
async fn start_cluster() -> Option<Cluster> {
    if Command::new("etcd").arg("--version").output().is_err() {
        skip_or_fail("the etcd binary is not installed (Debian etcd-server)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let token = format!("contend-failover-{}", contend_test_support::suffix());
    let mut members = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join(format!("m{i}.log"))).unwrap();
        let child = Command::new("etcd")
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(dir.path().join(format!("m{i}")))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args([
                "--initial-cluster",
                &cluster,
                "--initial-cluster-state",
                "new",
            ])
            .args(["--initial-cluster-token", &token, "--unsafe-no-fsync"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        members.push(Member { url, child });
    }
    let cluster = Cluster { members, _dir: dir };
    let urls = cluster.urls();
    let started = Instant::now();
    loop {
        let probe = EtcdLocks::builder(&urls)
            .request_timeout(Duration::from_secs(1))
            .connect()
            .await;
        if let Ok(locks) = probe
            && locks.acquire("probe").await.is_ok()
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the test's etcd cluster did not start"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("own etcd cluster up in {:?}", started.elapsed());
    Some(cluster)
}

impl Cluster {
    fn urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.url.clone()).collect()
    }

    /// Kills member `i` (SIGKILL: no goodbye to its peers).
    fn kill(&mut self, i: usize) {
        self.members[i].child.kill().unwrap();
        self.members[i].child.wait().unwrap();
    }

    /// The index of the current leader.
    async fn leader(&self) -> usize {
        for (i, m) in self.members.iter().enumerate() {
            let Ok(mut c) = etcd_client::Client::connect([m.url.as_str()], None).await else {
                continue;
            };
            if let Ok(status) = c.status().await
                && status
                    .header()
                    .is_some_and(|h| h.member_id() == status.leader())
            {
                return i;
            }
        }
        panic!("no leader found");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_down_still_works_two_down_refuse_quickly() {
    let Some(mut cluster) = start_cluster().await else {
        return;
    };
    let timeout = Duration::from_secs(4);
    let connect = |urls: Vec<String>| async move {
        EtcdLocks::builder(&urls)
            .lease_ttl(Duration::from_secs(3))
            .request_timeout(timeout)
            .wait(Duration::from_secs(10))
            .connect()
            .await
            .unwrap()
    };
    let (a, b) = (connect(cluster.urls()).await, connect(cluster.urls()).await);
    let token = {
        let g = a.acquire("k").await.unwrap();
        let t = g.fencing_token();
        g.release().await.unwrap();
        t
    };

    // Kill the leader: an election, then the two others carry on.
    let leader = cluster.leader().await;
    cluster.kill(leader);
    let started = Instant::now();
    let mut last = token;
    for round in 0..10 {
        let (x, y) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let held = x.acquire("k").await.expect("lock with 1 of 3 members down");
        assert!(held.fencing_token() > last);
        last = held.fencing_token();
        // A waiter on the other client is handed the lock when this one releases.
        let waiter = tokio::spawn({
            let y = y.clone();
            async move { y.acquire("k").await.map(|g| g.fencing_token()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        held.release().await.unwrap();
        let next = waiter
            .await
            .unwrap()
            .expect("waiter granted with 1 of 3 down");
        assert!(next > last);
        last = next;
        // The waiter's guard was dropped in its task: wait for its release to land.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("20 grants with 1 of 3 down in {:?}", started.elapsed());

    // A holder at the moment the quorum goes.
    let held = a.acquire("held").await.unwrap();
    let survivor = (0..3).find(|&i| i != leader).unwrap();
    cluster.kill(survivor);

    let started = Instant::now();
    let refused = b.acquire("other").await;
    let took = started.elapsed();
    let e = refused.expect_err("no quorum: the lock must be refused");
    println!("refused after {took:?}: {e}");
    assert!(
        took < timeout + Duration::from_secs(2),
        "refusal took {took:?}, more than the request timeout allows"
    );
    let text = e.to_string();
    assert!(
        text.contains("quorum"),
        "the error should say the quorum is missing: {text}"
    );
    // The holder's keepalives fail: within the TTL (+ one request timeout) it knows the lock is lost.
    let lost = tokio::time::timeout(Duration::from_secs(3) + timeout * 2, held.lost()).await;
    assert!(lost.is_ok(), "the holder was not told it lost the lock");
    assert!(held.is_lost());
}
