//! The real binary against a real PostgreSQL: protocols, casts, transactions, retries, broken
//! sources, debounce, hotload, shelldb, fprintf, render, and no secret in any output.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use dbtests::{PasswordKind, PgCluster, SecretDir};

/// A password with every character that breaks naive quoting.
const QUOTED_PW: &str = r#"it's a \"very\" \\secret\ pass'word; --"#;

fn su_uri(pg: &PgCluster, db: &str) -> String {
    pg.uri(pg.superuser(), pg.superuser_password(), db)
}

fn json_source(dir: &Path, name: &str, value: serde_json::Value) -> String {
    let p = dir.join(name);
    std::fs::write(&p, value.to_string()).unwrap();
    p.display().to_string()
}

async fn count(pg: &PgCluster, sql: &str) -> i64 {
    let c = pg.superuser_client().await.unwrap();
    c.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_statement_commands_and_args_with_casts() {
    let pg = PgCluster::start().expect("starting PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let src = json_source(
        dir.path(),
        "src.json",
        serde_json::json!({"user": "alice", "port": 6543, "note": "x'y"}),
    );
    let config = write_config(
        dir.path(),
        &format!(
            r#"configs:
  setup:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: {dsn}}}
    commands:
    - command: |
        DROP TABLE IF EXISTS t;
        CREATE TABLE t(id bigint, name text, small smallint, note text);
        INSERT INTO t VALUES (0, 'seed', 0, 'seed');
    - command: INSERT INTO t VALUES ($1, $2, $3, $4)
      args:
      - 'int64:{{{{ index . {src} "port" }}}}'
      - '{{{{ index . {src} "user" }}}}'
      - 'int16:7'
      - '{{{{ index . {src} "note" }}}}'
"#,
            src = yq(&src),
            dsn = yq(&su_uri(&pg, "postgres")),
        ),
    );
    let (status, _, err) = run_to_end(&["run", "-c", config.to_str().unwrap(), "--once"]);
    assert!(status.success(), "{err}");
    let c = pg.superuser_client().await.unwrap();
    let rows = c
        .query("SELECT id, name, small, note FROM t ORDER BY id", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].get::<_, i64>(0), 6543);
    assert_eq!(rows[1].get::<_, &str>(1), "alice");
    assert_eq!(rows[1].get::<_, i16>(2), 7);
    assert_eq!(rows[1].get::<_, &str>(3), "x'y");

    // A cast that does not fit fails the run with a message naming the argument.
    let bad = write_config(
        dir.path(),
        &format!(
            "configs:\n  bad:\n    sources: [{{driver: json, filename: {src}}}]\n    destination: {{driver: postgres, dsn: {dsn}}}\n    commands:\n    - command: SELECT $1::int\n      args: ['int8:{{{{ index . {src} \"port\" }}}}']\n",
            src = yq(&src),
            dsn = yq(&su_uri(&pg, "postgres")),
        ),
    );
    let (status, _, err) = run_to_end(&["run", "-c", bad.to_str().unwrap(), "--once"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("commands[0].args[0]"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transaction_per_run_and_the_switch_for_create_database() {
    let pg = PgCluster::start().expect("starting PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let src = json_source(
        dir.path(),
        "s.json",
        serde_json::json!({"db": "made_by_dsnexec"}),
    );
    let dsn = yq(&su_uri(&pg, "postgres"));
    let config = write_config(
        dir.path(),
        &format!(
            r#"configs:
  partial:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: {dsn}}}
    commands:
    - command: CREATE TABLE tx_a(x int)
    - command: SELECT * FROM no_such_table
  createdb_tx:
    disabled: true
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: {dsn}}}
    commands:
    - command: CREATE DATABASE {{{{ index . {src} "db" | sqlIdent }}}}
  createdb:
    disabled: true
    transaction: false
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: {dsn}}}
    commands:
    - command: CREATE DATABASE {{{{ index . {src} "db" | sqlIdent }}}}
"#,
            src = yq(&src),
        ),
    );
    let c = config.to_str().unwrap();

    let (status, _, err) = run_to_end(&["run", "-c", c, "--once"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("SQLSTATE 42P01"), "{err}");
    assert_eq!(
        count(&pg, "SELECT count(*) FROM pg_class WHERE relname = 'tx_a'").await,
        0,
        "the failed run's first command was rolled back"
    );

    // CREATE DATABASE cannot run in a transaction block: the per-config switch is needed.
    let (status, _, err) = run_to_end(&[
        "run",
        "-c",
        c,
        "--once",
        "-d",
        "partial",
        "-e",
        "createdb_tx",
    ]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("SQLSTATE 25001"), "{err}");
    let (status, _, err) =
        run_to_end(&["run", "-c", c, "--once", "-d", "partial", "-e", "createdb"]);
    assert!(status.success(), "{err}");
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM pg_database WHERE datname = 'made_by_dsnexec'"
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quoted_password_set_with_sql_literal_can_log_in() {
    let pg = PgCluster::start().expect("starting PostgreSQL");
    pg.create_role("odd role", "initial", PasswordKind::Scram)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("creds.yaml");
    std::fs::write(
        &src,
        format!("username: odd role\npassword: {}\n", yq(QUOTED_PW)),
    )
    .unwrap();
    let src = src.display().to_string();
    let config = write_config(
        dir.path(),
        &format!(
            r#"configs:
  rotate:
    sources: [{{driver: yaml, filename: {src}}}]
    destination: {{driver: postgres, dsn: {dsn}}}
    commands:
    - command: >-
        {{{{ $c := index . {src} }}}}ALTER ROLE {{{{ sqlIdent $c.username }}}}
        PASSWORD {{{{ sqlLiteral $c.password }}}}
"#,
            src = yq(&src),
            dsn = yq(&su_uri(&pg, "postgres")),
        ),
    );
    let (status, out, err) = run_to_end(&["run", "-c", config.to_str().unwrap(), "--once"]);
    assert!(status.success(), "{err}");
    pg.connect("odd role", QUOTED_PW, "postgres")
        .await
        .expect("logging in with the password dsnexec set");
    assert_no_secret(&format!("{out}{err}"), &[QUOTED_PW]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_run_is_retried_until_it_succeeds() {
    let pg = PgCluster::start().expect("starting PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let src = json_source(dir.path(), "s.json", serde_json::json!({"v": "hello"}));
    let config = write_config(
        dir.path(),
        &format!(
            r#"configs:
  later:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: {dsn}}}
    retry: {{initial: 200ms, max: 1s}}
    commands:
    - command: INSERT INTO later(v) VALUES ($1)
      args: ['{{{{ index . {src} "v" }}}}']
"#,
            src = yq(&src),
            dsn = yq(&su_uri(&pg, "postgres")),
        ),
    );
    let mut d = Daemon::start(&config, &[]);
    let ops = d.ops_addr().await;
    d.wait_for_log("run failed", 2).await;
    assert_eq!(
        http_get(ops, "/readyz").0,
        503,
        "not ready before a success"
    );
    assert_eq!(http_get(ops, "/healthz").0, 200, "alive while failing");
    assert!(d.log().contains("SQLSTATE 42P01"), "{}", d.log());

    pg.execute("CREATE TABLE later(v text)").await.unwrap();
    eventually("the retried insert", || async {
        (count(&pg, "SELECT count(*) FROM later WHERE v = 'hello'").await == 1).then_some(())
    })
    .await;
    eventually("readiness", || async {
        (http_get(ops, "/readyz").0 == 200).then_some(())
    })
    .await;
    let (_, metrics) = http_get(ops, "/metrics");
    assert!(
        metric(&metrics, "dsnexec_run_failures_total", "later").unwrap_or(0.0) >= 2.0,
        "{metrics}"
    );
    // No change and no failure: no more runs.
    let runs = metric(&metrics, "dsnexec_runs_total", "later").unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, metrics) = http_get(ops, "/metrics");
    assert_eq!(metric(&metrics, "dsnexec_runs_total", "later"), Some(runs));
    assert_eq!(count(&pg, "SELECT count(*) FROM later").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_source_is_reported_and_the_next_good_one_applied() {
    let pg = PgCluster::start().expect("starting PostgreSQL");
    pg.execute("CREATE TABLE seen(v text, at timestamptz default now())")
        .await
        .unwrap();
    let secret = SecretDir::new().unwrap();
    secret.write(&[("creds.json", br#"{"v": "one"}"#)]).unwrap();
    let src = secret.file("creds.json").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            r#"configs:
  watch:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: {dsn}}}
    debounce: 200ms
    retry: {{initial: 200ms, max: 1s}}
    commands:
    - command: INSERT INTO seen(v) VALUES ({{{{ index . {src} "v" | sqlLiteral }}}})
"#,
            src = yq(&src),
            dsn = yq(&su_uri(&pg, "postgres")),
        ),
    );
    let mut d = Daemon::start(&config, &[]);
    let ops = d.ops_addr().await;
    eventually("the first run", || async {
        (count(&pg, "SELECT count(*) FROM seen WHERE v = 'one'").await == 1).then_some(())
    })
    .await;

    secret
        .write(&[("creds.json", br#"{"v": "broken-secret-text"#)])
        .unwrap();
    d.wait_for_log("file rejected", 1).await;
    assert!(d.alive());
    assert_eq!(http_get(ops, "/healthz").0, 200);

    secret.write(&[("creds.json", br#"{"v": "two"}"#)]).unwrap();
    eventually("the repaired source applied", || async {
        (count(&pg, "SELECT count(*) FROM seen WHERE v = 'two'").await == 1).then_some(())
    })
    .await;
    let log = d.stop();
    assert!(!log.contains("broken-secret-text"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_changes_across_sources_is_one_run() {
    let pg = PgCluster::start().expect("starting PostgreSQL");
    pg.execute("CREATE TABLE pairs(a text, b text)")
        .await
        .unwrap();
    let (s1, s2) = (SecretDir::new().unwrap(), SecretDir::new().unwrap());
    s1.write(&[("a", b"a1")]).unwrap();
    s2.write(&[("b", b"b1")]).unwrap();
    let (fa, fb) = (
        s1.file("a").display().to_string(),
        s2.file("b").display().to_string(),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            r#"configs:
  pair:
    sources: [{{driver: none, filename: {fa}}}, {{filename: {fb}}}]
    destination: {{driver: postgres, dsn: {dsn}}}
    debounce: 2s
    commands:
    - command: INSERT INTO pairs VALUES ($1, $2)
      args: ['{{{{ index . {fa} "raw_dsn" }}}}', '{{{{ index . {fb} "raw_dsn" }}}}']
"#,
            fa = yq(&fa),
            fb = yq(&fb),
            dsn = yq(&su_uri(&pg, "postgres")),
        ),
    );
    let mut d = Daemon::start(&config, &[]);
    d.wait_for_log("run succeeded", 1).await;
    // Two Secrets never update together: the second lands a little later.
    s1.write(&[("a", b"a2")]).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s2.write(&[("b", b"b2")]).unwrap();
    d.wait_for_log("run succeeded", 2).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let c = pg.superuser_client().await.unwrap();
    let rows: Vec<(String, String)> = c
        .query("SELECT a, b FROM pairs", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows,
        [("a1".into(), "b1".into()), ("a2".into(), "b2".into())],
        "one run for the burst, never a mix of old and new"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hotload_destination_follows_its_dsn_file() {
    let pg = PgCluster::start().expect("starting PostgreSQL");
    for user in ["user_a", "user_b"] {
        pg.create_role(user, &format!("{user}-pw"), PasswordKind::Scram)
            .await
            .unwrap();
    }
    pg.execute("CREATE TABLE who(u text); GRANT INSERT ON who TO user_a, user_b")
        .await
        .unwrap();
    let secret = SecretDir::new().unwrap();
    secret
        .write(&[(
            "uri_dsn.txt",
            pg.uri("user_a", "user_a-pw", "postgres").as_bytes(),
        )])
        .unwrap();
    let dsn_file = secret.file("uri_dsn.txt").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            r#"configs:
  hot:
    sources: []
    destination:
      driver: hotload
      dsn: {dsn}
    debounce: 200ms
    commands:
    - command: INSERT INTO who VALUES (current_user)
"#,
            dsn = yq(&format!("fsnotify://postgres{dsn_file}")),
        ),
    );
    let d = Daemon::start(&config, &[]);
    eventually("a run as user_a", || async {
        (count(&pg, "SELECT count(*) FROM who WHERE u = 'user_a'").await >= 1).then_some(())
    })
    .await;
    secret
        .write(&[(
            "uri_dsn.txt",
            pg.uri("user_b", "user_b-pw", "postgres").as_bytes(),
        )])
        .unwrap();
    eventually("a run as user_b after the DSN file changed", || async {
        (count(&pg, "SELECT count(*) FROM who WHERE u = 'user_b'").await >= 1).then_some(())
    })
    .await;
    let log = d.stop();
    assert_no_secret(&log, &["user_a-pw", "user_b-pw"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shelldb_and_fprintf_destinations() {
    let dir = tempfile::tempdir().unwrap();
    let src = json_source(
        dir.path(),
        "s.json",
        serde_json::json!({"password": QUOTED_PW, "user": "u1"}),
    );
    let out_arg = dir.path().join("from-argv.txt");
    let touched = dir.path().join("touched");
    let out_json = dir.path().join("out.json");
    let config = write_config(
        dir.path(),
        &format!(
            r#"configs:
  argv:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: shelldb, dsn: sh}}
    commands:
    - command: ignored when args are given
      args: ['-c', 'printf "%s" "$1" > "$2"', 'sh', '{{{{ index . {src} "password" }}}}', {out_arg}]
  single:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: shell, dsn: touch}}
    commands:
    - command: {touched}
  file:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: fprintf, dsn: {file_dsn}}}
    commands:
    - command: '%s'
      args: ['{{{{ index . {src} | toJson }}}}']
  slow:
    disabled: true
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: shelldb, dsn: sleep}}
    timeout: 1s
    commands:
    - command: "30"
"#,
            src = yq(&src),
            out_arg = yq(&out_arg.display().to_string()),
            touched = yq(&touched.display().to_string()),
            file_dsn = yq(&format!("file://{}", out_json.display())),
        ),
    );
    let c = config.to_str().unwrap();
    let (status, out, err) = run_to_end(&["run", "-c", c, "--once"]);
    assert!(status.success(), "{err}");
    assert_eq!(
        std::fs::read_to_string(&out_arg).unwrap(),
        QUOTED_PW,
        "argv passed verbatim"
    );
    assert!(
        touched.exists(),
        "the command is the program's one argument"
    );
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_json).unwrap()).unwrap();
    assert_eq!(written["password"], QUOTED_PW);
    assert_eq!(written["user"], "u1");
    assert_eq!(
        std::fs::metadata(&out_json).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_no_secret(&format!("{out}{err}"), &[QUOTED_PW]);

    let started = Instant::now();
    let (status, _, err) = run_to_end(&[
        "run",
        "-c",
        c,
        "--once",
        "-e",
        "slow",
        "-d",
        "argv,single,file",
    ]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("timed out"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the timeout stopped the program"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_prints_commands_with_values_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let src = json_source(
        dir.path(),
        "s.json",
        serde_json::json!({"password": QUOTED_PW, "user": "u1"}),
    );
    let config = write_config(
        dir.path(),
        &format!(
            r#"configs:
  sql:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: "postgres://x:destination-pw@127.0.0.1:1/db"}}
    commands:
    - command: ALTER ROLE {{{{ index . {src} "user" | sqlIdent }}}} PASSWORD {{{{ index . {src} "password" | sqlLiteral }}}}
    - command: SELECT $1
      args: ['{{{{ index . {src} "password" }}}}']
  typo:
    disabled: true
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: "host=x"}}
    commands:
    - command: SELECT {{{{ index . {src} "pasword" }}}}
"#,
            src = yq(&src),
        ),
    );
    let c = config.to_str().unwrap();
    let (status, out, err) = run_to_end(&["render", "-c", c]);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("<redacted:"), "{out}");
    assert!(out.contains("PASSWORD '<redacted:"), "{out}");
    assert!(out.contains("-- commands[1].args[0]: <redacted:"), "{out}");
    assert_no_secret(&format!("{out}{err}"), &[QUOTED_PW, "destination-pw"]);

    let (status, out, err) = run_to_end(&["render", "-c", c, "-e", "typo"]);
    assert_eq!(status.code(), Some(1));
    assert!(
        out.contains("missing key \\\"pasword\\\"") || out.contains("missing key \"pasword\""),
        "{out}"
    );
    assert_no_secret(&format!("{out}{err}"), &[QUOTED_PW]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_output_when_commands_fail() {
    let pg = PgCluster::start().expect("starting PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let src = json_source(
        dir.path(),
        "s.json",
        serde_json::json!({"password": QUOTED_PW, "plain": "plainsecretvalue42"}),
    );
    let dsn = yq(&su_uri(&pg, "postgres"));
    let wrong_dsn = yq(&pg.uri(pg.superuser(), "wrong-destination-pw", "postgres"));
    let config = write_config(
        dir.path(),
        &format!(
            r#"configs:
  unquoted:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: {dsn}}}
    commands:
    - command: ALTER ROLE postgres PASSWORD '{{{{ index . {src} "password" }}}}'
  identifier:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: {dsn}}}
    commands:
    - command: SELECT "{{{{ index . {src} "plain" }}}}"
  bad_input:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: {dsn}}}
    commands:
    - command: SELECT $1::int
      args: ['{{{{ index . {src} "plain" }}}}']
  cast:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: {dsn}}}
    commands:
    - command: SELECT $1
      args: ['int64:{{{{ index . {src} "plain" }}}}']
  missing:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: {dsn}}}
    commands:
    - command: SELECT {{{{ index . {src} "nope" }}}}
  wrong_login:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: {wrong_dsn}}}
    commands:
    - command: SELECT 1
"#,
            src = yq(&src),
        ),
    );
    let (status, out, err) = run_to_end(&["run", "-c", config.to_str().unwrap(), "--once"]);
    assert_eq!(status.code(), Some(1));
    let all = format!("{out}{err}");
    for expected in [
        "config \"unquoted\"",
        "SQLSTATE 42601",
        "config \"identifier\"",
        "SQLSTATE 42703",
        "SQLSTATE 22P02",
        "config \"cast\": commands[0].args[0]",
        "missing key",
        "nope",
        "SQLSTATE 28P01",
    ] {
        assert!(all.contains(expected), "{expected:?} missing from:\n{all}");
    }
    assert_no_secret(
        &all,
        &[
            QUOTED_PW,
            "plainsecretvalue42",
            "wrong-destination-pw",
            pg.superuser_password(),
            // Fragments a syntax error could quote.
            "pass'word",
            "word; --",
        ],
    );
}
