//! Tests of the PostgreSQL harness itself: every test of every crate relies on it.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use dbtests::{AuthMethod, PasswordKind, PgCluster, PgOptions};
use tokio_postgres::error::SqlState;

/// The SQLSTATE of the first PostgreSQL error in an error chain.
fn sqlstate(err: &anyhow::Error) -> Option<SqlState> {
    err.chain()
        .find_map(|e| e.downcast_ref::<tokio_postgres::Error>())
        .and_then(|e| e.code().cloned())
}

async fn current_user(client: &tokio_postgres::Client) -> String {
    let row = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    row.get(0)
}

async fn stored_password(cluster: &PgCluster, role: &str) -> String {
    let su = cluster.superuser_client().await.unwrap();
    let row = su
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test]
async fn scram_role_logs_in_and_queries() {
    let cluster = PgCluster::start().unwrap();
    assert_eq!(cluster.host(), "127.0.0.1");
    assert_ne!(cluster.port(), 0);
    cluster
        .create_role("app_user", "s3cret pw", PasswordKind::Scram)
        .await
        .unwrap();
    assert!(
        stored_password(&cluster, "app_user")
            .await
            .starts_with("SCRAM-SHA-256$4096:")
    );

    let client = cluster
        .connect("app_user", "s3cret pw", "postgres")
        .await
        .unwrap();
    assert_eq!(current_user(&client).await, "app_user");

    let su = cluster.superuser_client().await.unwrap();
    assert_eq!(current_user(&su).await, cluster.superuser());
    let row = su.query_one("SHOW password_encryption", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "scram-sha-256");

    let err = cluster
        .connect("app_user", "wrong", "postgres")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some(SqlState::INVALID_PASSWORD), "{err:#}");
}

#[tokio::test]
async fn md5_role_logs_in_on_md5_cluster() {
    let cluster = PgCluster::start_with(PgOptions {
        auth: AuthMethod::Md5,
        ..Default::default()
    })
    .unwrap();
    cluster
        .create_role("legacy", "md5 pass", PasswordKind::Md5)
        .await
        .unwrap();
    let stored = stored_password(&cluster, "legacy").await;
    assert_eq!(
        stored,
        postgres_protocol::password::md5(b"md5 pass", "legacy")
    );

    let client = cluster
        .connect("legacy", "md5 pass", "postgres")
        .await
        .unwrap();
    assert_eq!(current_user(&client).await, "legacy");
    let err = cluster
        .connect("legacy", "nope", "postgres")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some(SqlState::INVALID_PASSWORD), "{err:#}");

    // md5 in pg_hba.conf still lets SCRAM roles in (the server picks SCRAM for them).
    cluster
        .create_role("modern", "scram pass", PasswordKind::Scram)
        .await
        .unwrap();
    let client = cluster
        .connect("modern", "scram pass", "postgres")
        .await
        .unwrap();
    assert_eq!(current_user(&client).await, "modern");
}

#[tokio::test]
async fn md5_role_cannot_log_in_on_scram_cluster() {
    let cluster = PgCluster::start().unwrap();
    cluster
        .create_role("legacy", "md5 pass", PasswordKind::Md5)
        .await
        .unwrap();
    let err = cluster
        .connect("legacy", "md5 pass", "postgres")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some(SqlState::INVALID_PASSWORD), "{err:#}");
}

#[tokio::test]
async fn cleartext_password_method_works() {
    let cluster = PgCluster::start_with(PgOptions {
        auth: AuthMethod::Password,
        ..Default::default()
    })
    .unwrap();
    cluster
        .create_role("plain", "clear pass", PasswordKind::Scram)
        .await
        .unwrap();
    let client = cluster
        .connect("plain", "clear pass", "postgres")
        .await
        .unwrap();
    assert_eq!(current_user(&client).await, "plain");
    let hba = std::fs::read_to_string(cluster.data_dir().join("pg_hba.conf")).unwrap();
    assert!(hba.contains("127.0.0.1/32 password"), "{hba}");
}

#[tokio::test]
async fn alter_password_rejects_old_password() {
    let cluster = PgCluster::start().unwrap();
    cluster
        .create_role("rotating", "old-pw", PasswordKind::Scram)
        .await
        .unwrap();
    let before = cluster
        .connect("rotating", "old-pw", "postgres")
        .await
        .unwrap();

    cluster
        .alter_password("rotating", "new-pw", PasswordKind::Scram)
        .await
        .unwrap();
    let err = cluster
        .connect("rotating", "old-pw", "postgres")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some(SqlState::INVALID_PASSWORD), "{err:#}");
    let after = cluster
        .connect("rotating", "new-pw", "postgres")
        .await
        .unwrap();
    assert_eq!(current_user(&after).await, "rotating");
    // PostgreSQL keeps existing sessions after ALTER ROLE ... PASSWORD.
    assert_eq!(current_user(&before).await, "rotating");
}

#[tokio::test]
async fn group_roles_and_databases() {
    let cluster = PgCluster::start().unwrap();
    cluster.create_group_role("myapp").await.unwrap();
    cluster
        .create_role("myapp_a", "pw a", PasswordKind::Scram)
        .await
        .unwrap();
    cluster.grant_role("myapp_a", "myapp").await.unwrap();
    cluster.create_database("app db", "myapp").await.unwrap();

    let client = cluster.connect("myapp_a", "pw a", "app db").await.unwrap();
    let row = client
        .query_one(
            "SELECT current_database()::text, pg_has_role('myapp', 'MEMBER')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "app db");
    assert!(row.get::<_, bool>(1));
    // The group itself cannot log in.
    cluster
        .alter_password("myapp", "x", PasswordKind::Scram)
        .await
        .unwrap();
    let err = cluster.connect("myapp", "x", "postgres").await.unwrap_err();
    assert_eq!(
        sqlstate(&err),
        Some(SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err:#}"
    );
}

#[tokio::test]
async fn odd_names_are_quoted() {
    let cluster = PgCluster::start().unwrap();
    let name = "we\"ird 'role'";
    let password = "p@ss:w/o?r#d% '\\ \"x\"";
    cluster
        .create_role(name, password, PasswordKind::Scram)
        .await
        .unwrap();
    let client = cluster.connect(name, password, "postgres").await.unwrap();
    assert_eq!(current_user(&client).await, name);

    // The URI form encodes every special character.
    let uri = cluster.uri(name, password, "postgres");
    assert!(
        uri.starts_with("postgres://") && uri.ends_with("?sslmode=disable"),
        "{uri}"
    );
    let config: tokio_postgres::Config = uri.parse().unwrap();
    assert_eq!(config.get_user(), Some(name));
    assert_eq!(config.get_password(), Some(password.as_bytes()));
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    assert_eq!(current_user(&client).await, name);
}

#[tokio::test]
async fn passwords_never_reach_the_server_log() {
    let cluster = PgCluster::start().unwrap();
    let first = "first-secret-Zq81";
    let second = "second-secret-Yp72";
    cluster
        .create_role("audited", first, PasswordKind::Scram)
        .await
        .unwrap();
    cluster
        .alter_password("audited", second, PasswordKind::Md5)
        .await
        .unwrap();
    // A failing statement would normally be logged with its text (log_min_error_statement).
    let su = cluster.superuser_client().await.unwrap();
    let err = su
        .batch_execute(&format!("ALTER ROLE no_such_role PASSWORD '{second}'"))
        .await
        .unwrap_err();
    assert!(err.as_db_error().is_some());
    let _ = cluster
        .connect("audited", first, "postgres")
        .await
        .unwrap_err();

    let log = cluster.log();
    assert!(
        log.contains("connection authorized"),
        "log_connections should be on:\n{log}"
    );
    for secret in [first, second, cluster.superuser_password()] {
        assert!(
            !log.contains(secret),
            "a password leaked into the server log"
        );
    }
    assert!(!format!("{cluster:?}").contains(cluster.superuser_password()));
}

#[tokio::test]
async fn stop_and_restart_keep_data_and_port() {
    let mut cluster = PgCluster::start().unwrap();
    let port = cluster.port();
    cluster
        .execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here')")
        .await
        .unwrap();
    cluster.stop().unwrap();
    assert!(!cluster.is_running());
    assert!(cluster.superuser_client().await.is_err());
    cluster.stop().unwrap(); // stopping twice is harmless

    cluster.restart().unwrap();
    assert_eq!(cluster.port(), port);
    let su = cluster.superuser_client().await.unwrap();
    let row = su.query_one("SELECT v FROM kept", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "still here");
    // restart of a running server works too.
    cluster.restart().unwrap();
    cluster.superuser_client().await.unwrap();
}

#[tokio::test]
async fn kill_then_restart_recovers() {
    let mut cluster = PgCluster::start().unwrap();
    let su = cluster.superuser_client().await.unwrap();
    // synchronous_commit is off in the harness: make this commit durable before the crash.
    su.batch_execute(
        "SET synchronous_commit = on; CREATE TABLE crash (v int); INSERT INTO crash VALUES (7)",
    )
    .await
    .unwrap();

    cluster.kill().unwrap();
    assert!(!cluster.is_running());
    assert!(
        su.query_one("SELECT 1", &[]).await.is_err(),
        "session survived a kill"
    );
    assert!(!cluster.data_dir().join("postmaster.pid").exists());

    cluster.restart().unwrap();
    let su = cluster.superuser_client().await.unwrap();
    let row = su.query_one("SELECT v FROM crash", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
    assert!(cluster.log().contains("not properly shut down"));
}

#[test]
fn two_clusters_in_parallel() {
    let handles: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(|| PgCluster::start().unwrap()))
        .collect();
    let clusters: Vec<PgCluster> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_ne!(clusters[0].port(), clusters[1].port());
    assert_ne!(clusters[0].dir(), clusters[1].dir());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        for (i, cluster) in clusters.iter().enumerate() {
            let name = format!("only_in_{i}");
            cluster
                .create_role(&name, "pw", PasswordKind::Scram)
                .await
                .unwrap();
        }
        // Each role exists in its own cluster only.
        let err = clusters[1]
            .connect("only_in_0", "pw", "postgres")
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&err), Some(SqlState::INVALID_PASSWORD), "{err:#}");
        clusters[0]
            .connect("only_in_0", "pw", "postgres")
            .await
            .unwrap();
        clusters[1]
            .connect("only_in_1", "pw", "postgres")
            .await
            .unwrap();
    });
}

#[test]
fn missing_binaries_say_what_to_install() {
    let empty = tempfile::tempdir().unwrap();
    let err = PgCluster::start_with(PgOptions {
        bin_dir: Some(empty.path().to_path_buf()),
        ..Default::default()
    })
    .unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("apt-get install postgresql"), "{text}");
    assert!(text.contains("initdb"), "{text}");
}

#[test]
fn bin_dir_holds_the_client_tools() {
    let dir = PgCluster::bin_dir().unwrap();
    for tool in ["initdb", "postgres", "psql", "pgbench"] {
        assert!(
            dir.join(tool).is_file(),
            "{tool} missing in {}",
            dir.display()
        );
    }
}

#[test]
fn drop_stops_the_server_and_removes_the_directory() {
    let cluster = PgCluster::start().unwrap();
    let dir = cluster.dir().to_path_buf();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, cluster.port()));
    assert!(dir.join("data/PG_VERSION").is_file());
    assert!(TcpStream::connect(addr).is_ok());
    drop(cluster);
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(TcpStream::connect(addr).is_err(), "server still listening");
}

#[test]
fn drop_after_a_panic_cleans_up() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let cluster = PgCluster::start().unwrap();
        tx.send(cluster.dir().to_path_buf()).unwrap();
        panic!("test failure while a cluster is running (expected by this test)");
    })
    .join();
    assert!(result.is_err());
    let dir = rx.recv().unwrap();
    assert!(!dir.exists(), "{} still exists", dir.display());
}

#[test]
fn start_is_reasonably_fast() {
    // Not a benchmark: catches a regression to running initdb for every cluster.
    PgCluster::start().unwrap(); // warm the template cache
    let started = Instant::now();
    let cluster = PgCluster::start().unwrap();
    let elapsed = started.elapsed();
    drop(cluster);
    assert!(elapsed < Duration::from_secs(30), "start took {elapsed:?}");
    eprintln!("cluster start: {elapsed:?}");
}

#[test]
fn workspace_bin_finds_the_proxy() {
    let path = dbtests::binaries::workspace_bin("dbproxy").unwrap();
    assert!(path.is_file(), "{}", path.display());
    assert!(path.ends_with("debug/dbproxy"), "{}", path.display());
    let err = dbtests::binaries::workspace_bin("not-a-binary").unwrap_err();
    assert!(format!("{err}").contains("dbproxy"), "{err}");
}
