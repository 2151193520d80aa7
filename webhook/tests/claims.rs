//! Claim lookup against a local HTTP server that serves real Kubernetes API JSON for the
//! DatabaseClaim and DbRoleClaim GET endpoints (objects and the API's 404 Status), with a
//! real `kube::Client` pointed at it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dbwebhook::claims::{ClaimResolver, ResolverConfig};
use dbwebhook::decision::ClaimLookup;

fn quick() -> ResolverConfig {
    ResolverConfig {
        positive_ttl: Duration::from_secs(60),
        negative_ttl: Duration::from_millis(300),
        timeout: Duration::from_secs(2),
    }
}

#[tokio::test]
async fn resolves_both_claim_kinds_and_reports_what_is_missing() {
    let (api, client, _) = start_fake_api().await;
    api.add_claim("ns1", "DatabaseClaim", "db", Some("db-secret"));
    api.add_claim("ns1", "DbRoleClaim", "role", Some("role-secret"));
    api.add_claim("ns1", "DatabaseClaim", "new", None);
    api.add_claim("ns2", "DatabaseClaim", "db", Some("other-ns-secret"));
    let resolver = ClaimResolver::new(client, quick());
    assert_eq!(
        resolver.resolve("ns1", "db").await,
        ClaimLookup::Found("db-secret".into())
    );
    assert_eq!(
        resolver.resolve("ns1", "role").await,
        ClaimLookup::Found("role-secret".into())
    );
    assert_eq!(
        resolver.resolve("ns2", "db").await,
        ClaimLookup::Found("other-ns-secret".into())
    );
    assert_eq!(
        resolver.resolve("ns1", "new").await,
        ClaimLookup::NoSecretName {
            kind: "DatabaseClaim".into()
        }
    );
    assert_eq!(
        resolver.resolve("ns1", "ghost").await,
        ClaimLookup::NotFound
    );
}

#[tokio::test]
async fn results_are_cached_and_negatives_expire_quickly() {
    let (api, client, _) = start_fake_api().await;
    api.add_claim("ns", "DatabaseClaim", "db", Some("s"));
    let resolver = ClaimResolver::new(client, quick());
    assert_eq!(
        resolver.resolve("ns", "db").await,
        ClaimLookup::Found("s".into())
    );
    let after_first = api.request_count();
    for _ in 0..5 {
        assert_eq!(
            resolver.resolve("ns", "db").await,
            ClaimLookup::Found("s".into())
        );
    }
    assert_eq!(
        api.request_count(),
        after_first,
        "positive result served from cache"
    );

    assert_eq!(resolver.resolve("ns", "later").await, ClaimLookup::NotFound);
    let n = api.request_count();
    assert_eq!(resolver.resolve("ns", "later").await, ClaimLookup::NotFound);
    assert_eq!(api.request_count(), n, "negative result cached briefly");
    api.add_claim("ns", "DbRoleClaim", "later", Some("late"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        resolver.resolve("ns", "later").await,
        ClaimLookup::Found("late".into())
    );
}

#[tokio::test]
async fn a_slow_api_server_is_given_up_on_within_the_timeout() {
    let (api, client, _) = start_fake_api().await;
    api.add_claim("ns", "DatabaseClaim", "db", Some("s"));
    if let Ok(mut d) = api.delay.lock() {
        *d = Duration::from_secs(10);
    }
    let resolver = ClaimResolver::new(
        client,
        ResolverConfig {
            timeout: Duration::from_millis(500),
            ..quick()
        },
    );
    let start = Instant::now();
    let result = resolver.resolve("ns", "db").await;
    assert!(
        matches!(&result, ClaimLookup::Unavailable(m) if m.contains("did not answer")),
        "{result:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn an_unreachable_api_server_is_unavailable_not_found() {
    // Bind then drop a listener: nothing listens on that port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let resolver = ClaimResolver::new(client, quick());
    let result = resolver.resolve("ns", "db").await;
    assert!(
        matches!(&result, ClaimLookup::Unavailable(m) if m.contains("retry")),
        "{result:?}"
    );
}
