//! A keepalive answered late: etcd renewed the lease when the keepalive arrived, but the answer
//! reached the client after the lease's validity had run out (an election under load does
//! this: CI saw a waiter fail with `LeaseLost` 3 s after a leader was killed, while etcd still
//! had its lease). A waiter must keep its place and be granted; the lease must stay alive
//! once the late answer is in. Against the shared cluster (`CONTEND_ETCD_URLS`), the client
//! under test reaching it through a proxy on 127.0.0.1 that can hold back etcd's answers.

use std::time::{Duration, Instant};

use contend_etcd::EtcdLocks;
use contend_test_support::{env_urls, suffix};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy to one etcd member. Requests pass at once; while `hold` is on, etcd's answers
/// wait in the proxy (and the kernel's buffers), then pass in order.
struct AnswerHold {
    url: String,
    hold: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl AnswerHold {
    async fn start(member_url: &str) -> AnswerHold {
        let upstream = member_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (hold, _) = watch::channel(false);
        let held = hold.subscribe();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, held) = (upstream.clone(), held.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::io::copy(&mut cr, &mut sw);
                    let down = async move {
                        let mut held = held;
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if held.wait_for(|h| !*h).await.is_err()
                                || cw.write_all(&buf[..n]).await.is_err()
                            {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        () = down => {}
                    }
                });
            }
        });
        AnswerHold { url, hold, accept }
    }

    fn hold(&self, on: bool) {
        self.hold.send_replace(on);
    }
}

impl Drop for AnswerHold {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Polls `f` every 10 ms until it is true; `false` when `within` runs out first.
async fn until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while !f() {
        if started.elapsed() > within {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_keeps_its_place_when_a_keepalive_is_answered_late() {
    let Some(urls) = env_urls("CONTEND_ETCD_URLS") else {
        return;
    };
    let ns = format!("late-keepalive-{}", suffix());
    let proxy = AnswerHold::start(&urls[0]).await;
    let a = EtcdLocks::builder(&urls)
        .namespace(&ns)
        .connect()
        .await
        .expect("connect A");
    // B: a 6 s lease (a keepalive every 2 s), and a request timeout long enough that the
    // held keepalive is still awaited when its answer comes.
    let b = EtcdLocks::builder(&[proxy.url.as_str()])
        .namespace(&ns)
        .lease_ttl(Duration::from_secs(6))
        .request_timeout(Duration::from_secs(8))
        .wait(Duration::from_secs(40))
        .connect()
        .await
        .expect("connect B through the proxy");

    let held = a.acquire("k").await.unwrap();
    // A lock B holds shows B's lease: its validity moves with every confirmed keepalive.
    let probe = b.acquire("probe").await.unwrap();
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.acquire("k").await }
    });

    // Start the hold 1 s after a confirmed keepalive: the next keepalive (2 s after the last)
    // reaches etcd, which renews the lease, and its answer is held.
    let before = probe.valid_until();
    assert!(
        until(Duration::from_secs(5), || probe.valid_until() != before).await,
        "B's lease was not renewed within 5 s"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiter.is_finished(), "B waits while A holds the lock");
    proxy.hold(true);
    let hold_started = Instant::now();
    // The lease's validity runs out about 5 s into the hold (6 s after the last confirmed send).
    let lapsed = until(Duration::from_secs(7), || probe.is_lost()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting_through_the_lapse = !waiter.is_finished();
    proxy.hold(false);
    println!(
        "answers held for {:?}; B's lease lapsed: {lapsed}",
        hold_started.elapsed()
    );
    assert!(
        lapsed,
        "the scenario did not happen: B's lease never lapsed during the hold"
    );
    assert!(
        waiting_through_the_lapse,
        "the waiter left the queue when its lease lapsed: {:?}",
        waiter.await
    );
    // The late answer confirms the lease again.
    assert!(
        until(Duration::from_secs(3), || !probe.is_lost()).await,
        "the late keepalive answer did not confirm B's lease"
    );

    let token_a = held.fencing_token();
    assert!(held.release().await.unwrap());
    let granted = waiter
        .await
        .unwrap()
        .expect("the waiter is granted when A releases");
    assert!(granted.fencing_token() > token_a);
    assert!(!granted.is_lost());
    // Past the validity the late answer gave (6 s after the held keepalive was sent): the next
    // keepalive went at once after the late answer, so the lease lives on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !probe.is_lost(),
        "B's lease ran out after the late answer: the next keepalive was not sent in time"
    );
    assert!(
        probe.release().await.unwrap(),
        "the probe's key was still there"
    );
    assert!(granted.release().await.unwrap());
}
