//! TLS to a postgres destination, against real PostgreSQL servers with and without `ssl=on`:
//! every sslmode as libpq means it, CA and host verification, client certificates, channel
//! binding, clear errors, and no secret in the output.

mod common;

use std::path::Path;

use common::*;
use dbtests::tls::{ServerCert, TestPki};
use dbtests::{PasswordKind, PgCluster, PgOptions};

const PW: &str = "tls-Secret-pw-9431xyz";

/// A key=value DSN for `user` on the cluster, with extra TLS keywords.
fn dsn(pg: &PgCluster, user: &str, password: Option<&str>, tls: &str) -> String {
    let pw = password
        .map(|p| format!(" password={p}"))
        .unwrap_or_default();
    format!(
        "host=127.0.0.1 port={} user={user}{pw} dbname=postgres {tls}",
        pg.port()
    )
}

/// A config whose one command records, in table `seen`, whether its own session uses TLS.
fn record_tls_config(dir: &Path, name: &str, dsn: &str) -> std::path::PathBuf {
    let src = dir.join("none.txt");
    std::fs::write(&src, "").unwrap();
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            r#"configs:
  {name}:
    sources: [{{driver: none, filename: {src}}}]
    destination: {{driver: postgres, dsn: {dsn}}}
    commands:
    - command: |
        INSERT INTO seen SELECT {lit}, s.ssl, current_user FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid();
"#,
            src = yq(&src.display().to_string()),
            dsn = yq(dsn),
            lit = format_args!("'{name}'"),
        ),
    )
    .unwrap();
    path
}

/// Runs `dsnexec run --once` on a config: success and everything it printed.
fn once(config: &Path) -> (bool, String) {
    let (status, out, err) = run_to_end(&["run", "-c", config.to_str().unwrap(), "--once"]);
    (status.success(), format!("{out}{err}"))
}

/// The table the configs write into, writable by every role.
async fn create_seen_table(pg: &PgCluster) {
    pg.execute(
        "CREATE TABLE seen(config text, ssl bool, usr text); GRANT INSERT ON seen TO PUBLIC",
    )
    .await
    .expect("creating table seen");
}

/// What the server saw for a config's session: (ssl, user).
async fn seen(pg: &PgCluster, config: &str) -> Option<(bool, String)> {
    let c = pg.superuser_client().await.unwrap();
    let rows = c
        .query("SELECT ssl, usr FROM seen WHERE config = $1", &[&config])
        .await
        .ok()?;
    rows.first().map(|r| (r.get(0), r.get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sslmode_against_a_tls_server() {
    let pki = TestPki::generate().expect("generating the test PKI");
    let options: PgOptions = pki
        .pg_options(
            ServerCert::Valid,
            &[
                "local all all scram-sha-256",
                // Client-certificate login, TLS only.
                "hostssl all cert_user 127.0.0.1/32 cert",
                // TLS only: libpq's `allow` must retry with TLS after the plaintext refusal.
                "hostnossl all tls_only 127.0.0.1/32 reject",
                // Plaintext only: libpq's `prefer` must retry without TLS after the refusal.
                "hostssl all plain_only 127.0.0.1/32 reject",
                "host all all 127.0.0.1/32 scram-sha-256",
            ],
        )
        .expect("TLS options");
    let pg = PgCluster::start_with(options).expect("starting PostgreSQL with ssl=on");
    for role in ["app", "tls_only", "plain_only"] {
        pg.create_role(role, PW, PasswordKind::Scram).await.unwrap();
    }
    pg.create_role("cert_user", "unused-cert-user-pw", PasswordKind::Scram)
        .await
        .unwrap();
    create_seen_table(&pg).await;
    let client = pki.client_files("cert_user").expect("client certificate");
    let dir = tempfile::tempdir().unwrap();
    let ca = pki.ca_cert.display().to_string();
    let mut outputs = String::new();

    // (config name, user, password, TLS keywords, expected ssl on the server side)
    let cases: &[(&str, &str, Option<&str>, String, bool)] = &[
        (
            "verify_full",
            "app",
            Some(PW),
            format!("sslmode=verify-full sslrootcert={ca} channel_binding=require"),
            true,
        ),
        (
            "verify_ca",
            "app",
            Some(PW),
            format!("sslmode=verify-ca sslrootcert={ca}"),
            true,
        ),
        ("require", "app", Some(PW), "sslmode=require".into(), true),
        ("prefer", "app", Some(PW), "sslmode=prefer".into(), true),
        ("disable", "app", Some(PW), "sslmode=disable".into(), false),
        (
            "allow_plain",
            "app",
            Some(PW),
            "sslmode=allow".into(),
            false,
        ),
        (
            "allow_retries_tls",
            "tls_only",
            Some(PW),
            "sslmode=allow".into(),
            true,
        ),
        (
            "prefer_retries_plain",
            "plain_only",
            Some(PW),
            "sslmode=prefer".into(),
            false,
        ),
        (
            "client_cert",
            "cert_user",
            None,
            format!(
                "sslmode=verify-full sslrootcert={ca} sslcert={} sslkey={}",
                client.cert.display(),
                client.key.display()
            ),
            true,
        ),
    ];
    for (name, user, password, tls, want_ssl) in cases {
        let config = record_tls_config(dir.path(), name, &dsn(&pg, user, *password, tls));
        let (ok, out) = once(&config);
        assert!(ok, "{name}: the run failed:\n{out}");
        let (ssl, usr) = seen(&pg, name)
            .await
            .unwrap_or_else(|| panic!("{name}: no row recorded:\n{out}"));
        assert_eq!(ssl, *want_ssl, "{name}: pg_stat_ssl.ssl");
        assert_eq!(&usr, user, "{name}");
        outputs.push_str(&out);
    }

    // A CA that did not sign the server's certificate: a clear error naming the file.
    let other_ca = pki.other_ca_cert.display().to_string();
    let config = record_tls_config(
        dir.path(),
        "wrong_ca",
        &dsn(
            &pg,
            "app",
            Some(PW),
            &format!("sslmode=verify-full sslrootcert={other_ca}"),
        ),
    );
    let (ok, out) = once(&config);
    assert!(!ok, "a wrong CA must fail:\n{out}");
    assert!(out.contains("not signed by a trusted CA"), "{out}");
    assert!(
        out.contains(&format!("sslrootcert file {other_ca}")),
        "{out}"
    );
    assert!(out.contains("config \"wrong_ca\": destination"), "{out}");
    outputs.push_str(&out);

    // verify-full with an sslrootcert file that does not exist: libpq refuses, so do we.
    let config = record_tls_config(
        dir.path(),
        "missing_root",
        &dsn(
            &pg,
            "app",
            Some(PW),
            &format!(
                "sslmode=verify-full sslrootcert={}",
                dir.path().join("absent-ca.crt").display()
            ),
        ),
    );
    let (ok, out) = once(&config);
    assert!(
        !ok,
        "a missing sslrootcert must fail under verify-full:\n{out}"
    );
    assert!(out.contains("absent-ca.crt"), "{out}");
    outputs.push_str(&out);

    assert_no_secret(&outputs, &[PW, pg.superuser_password()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_against_a_server_without_tls_fails_clearly() {
    let pg = PgCluster::start().expect("starting PostgreSQL");
    pg.create_role("app", PW, PasswordKind::Scram)
        .await
        .unwrap();
    create_seen_table(&pg).await;
    let dir = tempfile::tempdir().unwrap();

    let config = record_tls_config(
        dir.path(),
        "require",
        &dsn(&pg, "app", Some(PW), "sslmode=require"),
    );
    let (ok, out) = once(&config);
    assert!(
        !ok,
        "sslmode=require against a plaintext server must fail:\n{out}"
    );
    assert!(out.contains("does not support TLS"), "{out}");
    assert!(out.contains("sslmode=require"), "{out}");
    assert!(out.contains(&format!("127.0.0.1:{}", pg.port())), "{out}");
    let mut outputs = out;

    // prefer falls back to plaintext there, as libpq does.
    let config = record_tls_config(
        dir.path(),
        "prefer",
        &dsn(&pg, "app", Some(PW), "sslmode=prefer"),
    );
    let (ok, out) = once(&config);
    assert!(ok, "sslmode=prefer must fall back to plaintext:\n{out}");
    assert_eq!(seen(&pg, "prefer").await, Some((false, "app".to_owned())));
    outputs.push_str(&out);

    assert_no_secret(&outputs, &[PW, pg.superuser_password()]);
}
