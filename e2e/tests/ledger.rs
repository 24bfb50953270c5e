//! The budget ledger on a real nats-server: three holders (three
//! connections, as three routers) share one budget and one rate limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use optiroute_accounts::ledger::{Ledger, LedgerSettings, Limit};
use optiroute_testkit::nats_server::NatsServer;

fn settings() -> LedgerSettings {
    LedgerSettings {
        lease_ttl: Duration::from_secs(3),
        lease_idle: Duration::from_millis(200),
        budget_wait: Duration::from_secs(5),
        replicas: 1,
    }
}

async fn ledgers(nats: &NatsServer, n: usize) -> Vec<Ledger> {
    let mut out = Vec::new();
    for _ in 0..n {
        let nc = async_nats::connect(nats.url()).await.unwrap();
        out.push(Ledger::new(
            async_nats::jetstream::new(nc),
            "test-ledger".into(),
            settings(),
        ));
    }
    out
}

async fn used_in_kv(nats: &NatsServer, key: &str) -> serde_json::Value {
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let kv = async_nats::jetstream::new(nc)
        .get_key_value("test-ledger")
        .await
        .unwrap();
    let v = kv.get(key).await.unwrap().unwrap();
    serde_json::from_slice(&v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shared_budget_is_never_overspent_and_is_nearly_all_used() {
    let nats = NatsServer::start();
    let ls = ledgers(&nats, 3).await;
    // Each request reserves 30 (the most it could cost) and costs 10:
    // the budget covers exactly 100 of them.
    let capacity = 1_000;
    let limit = Limit::Budget { capacity };
    let spent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..300 {
        let l = ls[i % 3].clone();
        let spent = spent.clone();
        tasks.push(tokio::spawn(async move {
            let give_up = Instant::now() + Duration::from_secs(10);
            match l
                .reserve("budget.k.total", limit, 30, None, give_up)
                .await
                .unwrap()
            {
                Ok(hold) => {
                    // The provider call.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    spent.fetch_add(10, Ordering::SeqCst);
                    l.settle(hold, 10);
                    true
                }
                Err(refusal) => {
                    assert!(refusal.retry_after_secs.is_some() || refusal.exhausted);
                    false
                }
            }
        }));
    }
    let mut served = 0;
    for t in tasks {
        served += usize::from(t.await.unwrap());
    }
    let spent = spent.load(Ordering::SeqCst);
    assert!(spent <= capacity, "spent {spent} of {capacity}");
    // Bound: a request is refused only when settled spend leaves less than
    // one reservation (30) of room, so at most 2 requests' worth is unused.
    assert!(served >= 98, "served {served}");
    // Every settle is flushed: KV's `used` is what was charged.
    optiroute_testkit::wait_until("flushed", Duration::from_secs(5), || {
        let nats = &nats;
        async move { used_in_kv(nats, "budget.k.total").await["used"] == spent }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_holders_lease_comes_back_after_its_ttl_and_nothing_is_counted_twice() {
    let nats = NatsServer::start();
    let a = ledgers(&nats, 1).await.remove(0);
    let b = ledgers(&nats, 1).await.remove(0);
    let limit = Limit::Budget { capacity: 100 };
    let far = || Instant::now() + Duration::from_secs(30);
    // A settles 40 (flushed), then reserves 60 and "dies" holding it.
    let h = a
        .reserve("budget.d.total", limit, 40, None, far())
        .await
        .unwrap()
        .unwrap();
    a.settle(h, 40);
    let held = a
        .reserve("budget.d.total", limit, 60, None, far())
        .await
        .unwrap()
        .unwrap();
    std::mem::forget(held);
    // B cannot have it while the lease lives...
    let refused = b
        .reserve(
            "budget.d.total",
            limit,
            60,
            None,
            Instant::now() + Duration::from_millis(500),
        )
        .await;
    // Refused, or out of time at the deadline: not granted.
    assert!(!matches!(refused, Ok(Ok(_))), "the lease is still held");
    // ...and gets it after the TTL (3 s; A never renews: its flusher is
    // stopped without giving back, like a killed process).
    a.abandon();
    let started = Instant::now();
    let h = b
        .reserve("budget.d.total", limit, 60, None, far())
        .await
        .unwrap()
        .unwrap();
    b.settle(h, 60);
    assert!(started.elapsed() < Duration::from_secs(10));
    optiroute_testkit::wait_until("flushed", Duration::from_secs(5), || {
        let nats = &nats;
        async move { used_in_kv(nats, "budget.d.total").await["used"] == 100 }
    })
    .await;
    // Spent in full: refused at once, as exhausted.
    let r = b
        .reserve("budget.d.total", limit, 1, None, far())
        .await
        .unwrap();
    assert!(r.as_ref().is_err_and(|r| r.exhausted), "{:?}", r.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_admits_its_capacity_across_holders_then_refills() {
    let nats = NatsServer::start();
    let ls = ledgers(&nats, 2).await;
    let limit = Limit::Rate { capacity: 30 };
    let mut tasks = Vec::new();
    for i in 0..100 {
        let l = ls[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            match l
                .reserve(
                    "rpm.k",
                    limit,
                    1,
                    None,
                    Instant::now() + Duration::from_secs(5),
                )
                .await
                .unwrap()
            {
                Ok(h) => {
                    l.settle(h, 1);
                    None
                }
                Err(r) => Some(r.retry_after_secs),
            }
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            None => ok += 1,
            Some(retry) => assert!(retry.is_some_and(|s| (1..=60).contains(&s)), "{retry:?}"),
        }
    }
    assert!(ok <= 30, "{ok} admitted");
    assert!(ok >= 28, "{ok} admitted");
    // 30 a minute refills one every 2 s.
    optiroute_testkit::wait_until("refilled", Duration::from_secs(6), || {
        let l = ls[0].clone();
        async move {
            match l
                .reserve(
                    "rpm.k",
                    limit,
                    1,
                    None,
                    Instant::now() + Duration::from_secs(5),
                )
                .await
                .unwrap()
            {
                Ok(h) => {
                    l.settle(h, 1);
                    true
                }
                Err(_) => false,
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closing_waits_for_the_requests_in_flight_and_writes_their_spend_back() {
    let nats = NatsServer::start();
    let l = ledgers(&nats, 1).await.remove(0);
    let limit = Limit::Budget { capacity: 1_000 };
    let far = Instant::now() + Duration::from_secs(30);
    let hold = l
        .reserve("budget.c.total", limit, 50, None, far)
        .await
        .unwrap()
        .unwrap();
    // The service drains: the request settles after close began.
    let closing = {
        let l = l.clone();
        tokio::spawn(async move { l.close(Duration::from_secs(5)).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    l.settle(hold, 40);
    closing.await.unwrap();
    let entry = used_in_kv(&nats, "budget.c.total").await;
    assert_eq!(entry["used"], 40, "{entry}");
    let leased: u64 = entry["leases"]
        .as_object()
        .unwrap()
        .values()
        .map(|l| l["amount"].as_u64().unwrap())
        .sum();
    assert_eq!(leased, 0, "everything given back: {entry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lowered_budget_holds_against_capacity_leased_before() {
    let nats = NatsServer::start();
    let l = ledgers(&nats, 1).await.remove(0);
    let far = || Instant::now() + Duration::from_secs(30);
    // Under 1,000 the lease takes a chunk beyond the 10 reserved.
    let h = l
        .reserve(
            "budget.l.total",
            Limit::Budget { capacity: 1_000 },
            10,
            None,
            far(),
        )
        .await
        .unwrap()
        .unwrap();
    l.settle(h, 10);
    // The budget is lowered to 15: 10 spent, so 10 more do not fit.
    let r = l
        .reserve(
            "budget.l.total",
            Limit::Budget { capacity: 15 },
            10,
            None,
            far(),
        )
        .await
        .unwrap();
    assert!(
        r.as_ref().is_err_and(|r| r.exhausted),
        "served past a lowered budget"
    );
    let h = l
        .reserve(
            "budget.l.total",
            Limit::Budget { capacity: 15 },
            5,
            None,
            far(),
        )
        .await
        .unwrap()
        .unwrap();
    l.settle(h, 5);
}
