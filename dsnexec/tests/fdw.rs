//! End to end: dsnexec keeps a postgres_fdw user mapping in sync while the remote password
//! rotates, with a query through the foreign table succeeding after each rotation.

mod common;

use std::time::Instant;

use common::*;
use dbtests::{PasswordKind, PgCluster, SecretDir};

const REMOTE_USER: &str = "remote_owner";
const LOCAL_USER: &str = "app_reader";
const LOCAL_PW: &str = "local-reader-pw";

/// Passwords with every quote character a template could break on.
fn password(n: usize) -> String {
    format!(
        "rot{n}-it's \\back\\ \"dq\" ${}-{}",
        std::process::id(),
        n * 7919
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_mapping_follows_remote_password_rotation() {
    let pg = PgCluster::start().expect("starting PostgreSQL");

    // Remote side (loopback: the same cluster, another database and role).
    let first = password(0);
    pg.create_role(REMOTE_USER, &first, PasswordKind::Scram)
        .await
        .unwrap();
    pg.create_database("remotedb", REMOTE_USER).await.unwrap();
    let remote = pg.connect(REMOTE_USER, &first, "remotedb").await.unwrap();
    remote
        .batch_execute(
            "CREATE TABLE items(id int, name text); INSERT INTO items VALUES (1,'a'),(2,'b'),(3,'c');",
        )
        .await
        .unwrap();
    drop(remote);

    // Local side: a non-superuser reads through the foreign table, so postgres_fdw insists
    // on a password in the user mapping and on the remote actually asking for it.
    pg.create_role(LOCAL_USER, LOCAL_PW, PasswordKind::Scram)
        .await
        .unwrap();
    pg.execute("CREATE DATABASE app").await.unwrap();
    let su = pg
        .connect(pg.superuser(), pg.superuser_password(), "app")
        .await
        .unwrap();
    su.batch_execute(&format!(
        "CREATE EXTENSION postgres_fdw;
         CREATE SERVER remote FOREIGN DATA WRAPPER postgres_fdw
           OPTIONS (host '127.0.0.1', port '{}', dbname 'remotedb');
         GRANT USAGE ON FOREIGN SERVER remote TO {LOCAL_USER};
         CREATE USER MAPPING FOR {LOCAL_USER} SERVER remote
           OPTIONS (user '{REMOTE_USER}', password 'not-yet-known');
         CREATE FOREIGN TABLE remote_items (id int, name text)
           SERVER remote OPTIONS (table_name 'items');
         GRANT SELECT ON remote_items TO {LOCAL_USER};",
        pg.port()
    ))
    .await
    .unwrap();
    drop(su);

    // The Secret db-controller would write for the remote database.
    let secret = SecretDir::new().unwrap();
    secret
        .write(&[(
            "uri_dsn.txt",
            pg.uri(REMOTE_USER, &first, "remotedb").as_bytes(),
        )])
        .unwrap();
    let source = secret.file("uri_dsn.txt");
    let source = source.display();

    let dir = tempfile::tempdir().unwrap();
    let dest = pg.uri(pg.superuser(), pg.superuser_password(), "app");
    let config = write_config(
        dir.path(),
        &format!(
            r#"configs:
  fdw:
    sources:
    - driver: postgres
      filename: {source}
    destination:
      driver: postgres
      dsn: {dest}
    debounce: 200ms
    retry: {{initial: 200ms, max: 2s}}
    commands:
    - command: |-
        ALTER USER MAPPING FOR {LOCAL_USER} SERVER remote
          OPTIONS (SET password {{{{ index . {source} "password" | sqlLiteral }}}});
"#,
            source = yq(&source.to_string()),
            dest = yq(&dest),
        ),
    );
    let mut d = Daemon::start(&config, &[]);
    let ops = d.ops_addr().await;

    let query_works = || async {
        let c = pg.connect(LOCAL_USER, LOCAL_PW, "app").await.ok()?;
        let row = c
            .query_one("SELECT count(*) FROM remote_items", &[])
            .await
            .ok()?;
        (row.get::<_, i64>(0) == 3).then_some(())
    };
    eventually("the first sync of the user mapping", query_works).await;
    eventually("readiness", || async {
        (http_get(ops, "/readyz").0 == 200).then_some(())
    })
    .await;

    let mut secrets = vec![first.clone()];
    for n in 1..=3 {
        let pw = password(n);
        secrets.push(pw.clone());
        pg.alter_password(REMOTE_USER, &pw, PasswordKind::Scram)
            .await
            .unwrap();
        let rotated = Instant::now();
        secret
            .write(&[(
                "uri_dsn.txt",
                pg.uri(REMOTE_USER, &pw, "remotedb").as_bytes(),
            )])
            .unwrap();
        eventually(&format!("the query after rotation {n}"), query_works).await;
        eprintln!(
            "rotation {n}: foreign table readable {} ms after the Secret update",
            rotated.elapsed().as_millis()
        );
    }

    let (_, metrics) = http_get(ops, "/metrics");
    let runs = metric(&metrics, "dsnexec_runs_total", "fdw").unwrap_or(0.0);
    assert!(runs >= 4.0, "one run per rotation at least:\n{metrics}");
    assert!(
        metric(&metrics, "dsnexec_last_success_timestamp_seconds", "fdw").unwrap_or(0.0) > 0.0,
        "{metrics}"
    );
    assert_eq!(http_get(ops, "/healthz").0, 200);

    let log = d.stop();
    let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_secret(&log, &refs);
    assert_no_secret(&metrics, &refs);
    assert!(!log.contains(pg.superuser_password()), "{log}");
}
