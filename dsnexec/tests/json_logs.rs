//! `--log-format json`: every line is a JSON object, and no secret appears in it, neither as
//! written nor JSON-escaped, across successful and failed runs.

mod common;

use common::*;
use dbtests::{PasswordKind, PgCluster};

/// Quotes, backslashes and a comment marker: what breaks naive quoting and JSON escaping.
const PW: &str = r#"json's \"log\" \\secret; --"#;
const PLAIN: &str = "plainsecretvalue-json-51";

/// Every string inside a JSON value, decoded.
fn strings(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
        serde_json::Value::Object(o) => {
            for (k, v) in o {
                out.push_str(k);
                out.push('\n');
                strings(v, out);
            }
        }
        _ => {}
    }
}

/// Checks every line is a JSON object with a level and a message; returns the decoded text.
fn decode_json_lines(stderr: &str) -> String {
    let mut decoded = String::new();
    let mut lines = 0;
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v.get("level").is_some(), "no level: {line}");
        assert!(v.pointer("/fields/message").is_some(), "no message: {line}");
        strings(&v, &mut decoded);
        lines += 1;
    }
    assert!(lines > 0, "no log lines at all");
    decoded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_hold_no_secret_on_success_or_failure() {
    let pg = PgCluster::start().expect("starting PostgreSQL");
    pg.create_role("rotated", "initial-pw", PasswordKind::Scram)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.json");
    std::fs::write(
        &src,
        serde_json::json!({"password": PW, "plain": PLAIN}).to_string(),
    )
    .unwrap();
    let src = yq(&src.display().to_string());
    let dsn = yq(&pg.uri(pg.superuser(), pg.superuser_password(), "postgres"));
    let wrong_dsn = yq(&pg.uri(pg.superuser(), "wrong-json-destination-pw", "postgres"));

    let ok = write_config(
        dir.path(),
        &format!(
            r#"configs:
  rotate:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: {dsn}}}
    commands:
    - command: ALTER ROLE rotated PASSWORD {{{{ index . {src} "password" | sqlLiteral }}}}
"#
        ),
    );
    let (status, out, err) = run_to_end(&[
        "--log-format",
        "json",
        "run",
        "-c",
        ok.to_str().unwrap(),
        "--once",
    ]);
    assert!(status.success(), "{err}");
    pg.connect("rotated", PW, "postgres")
        .await
        .expect("the password dsnexec set works");
    let mut raw = format!("{out}{err}");
    let mut decoded = decode_json_lines(&err);
    assert!(decoded.contains("run succeeded"), "{decoded}");

    let failing = write_config(
        dir.path(),
        &format!(
            r#"configs:
  unquoted:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: {dsn}}}
    commands:
    - command: ALTER ROLE rotated PASSWORD '{{{{ index . {src} "password" }}}}'
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
      args: ['{{{{ index . {src} "password" }}}}']
  wrong_login:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: postgres, dsn: {wrong_dsn}}}
    commands:
    - command: SELECT 1
  shell:
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: shelldb, dsn: /bin/false}}
    commands:
    - command: '{{{{ index . {src} "password" }}}}'
"#
        ),
    );
    let (status, out, err) = run_to_end(&[
        "run",
        "--log-format",
        "json",
        "-c",
        failing.to_str().unwrap(),
        "--once",
    ]);
    assert_eq!(status.code(), Some(1), "{err}");
    let failed = decode_json_lines(&err);
    for expected in [
        "SQLSTATE 42601",
        "SQLSTATE 42703",
        "SQLSTATE 22P02",
        "SQLSTATE 28P01",
        "config \"shell\"",
    ] {
        assert!(
            failed.contains(expected),
            "{expected:?} missing from:\n{failed}"
        );
    }
    raw.push_str(&out);
    raw.push_str(&err);
    decoded.push_str(&failed);

    let secrets = [
        PW,
        PLAIN,
        "wrong-json-destination-pw",
        pg.superuser_password(),
        "\\\"log\\\"",
        "secret; --",
    ];
    assert_no_secret(&decoded, &secrets);
    assert_no_secret(&raw, &secrets);
    // The JSON-escaped form of the password, as it would sit inside a JSON string.
    let escaped = serde_json::Value::String(PW.to_owned()).to_string();
    assert!(!raw.contains(escaped.trim_matches('"')), "{raw}");
}
