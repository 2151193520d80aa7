//! The config file is a mounted Secret too: a new version written the kubelet's way is
//! validated and applied (only changed configs restart), an invalid one is rejected with an
//! error naming the field and the running configs carry on.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use dbtests::SecretDir;

/// A secret that sits in the config file and must never be logged.
const DSN_PW: &str = "config-file-Secret-77x";

fn fprintf_config(name: &str, src: &str, out: &Path, prefix: &str) -> String {
    format!(
        r#"  {name}:
    debounce: 100ms
    sources: [{{driver: json, filename: {src}}}]
    destination: {{driver: fprintf, dsn: {dsn}}}
    commands:
    - command: '{prefix} {{{{ index . {src} "v" }}}}'
"#,
        src = yq(src),
        dsn = yq(&format!("file://{}", out.display())),
    )
}

/// A disabled postgres config holding a password, present in every version of the file.
fn disabled_pg() -> String {
    format!(
        "  dormant:\n    disabled: true\n    destination: {{driver: postgres, dsn: {}}}\n    commands: [{{command: SELECT 1}}]\n",
        yq(&format!(
            "postgres://app:{DSN_PW}@127.0.0.1:1/app?sslmode=disable"
        ))
    )
}

fn runs_of(log: &str, config: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("run started") && l.contains(&format!("config={config} ")))
        .count()
}

async fn wait_file(path: &Path, want: &str) {
    eventually(&format!("{} to hold {want:?}", path.display()), || async {
        (std::fs::read_to_string(path).ok().as_deref() == Some(want)).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_config_file_is_applied_and_an_invalid_one_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src.json");
    std::fs::write(&src_path, r#"{"v": "one"}"#).unwrap();
    let src = src_path.display().to_string();
    let keep_out = dir.path().join("keep.out");
    let change_out = dir.path().join("change.out");
    let added_out = dir.path().join("added.out");

    let secret = SecretDir::new().unwrap();
    let v1 = format!(
        "configs:\n{}{}{}",
        fprintf_config("keep", &src, &keep_out, "keep"),
        fprintf_config("change", &src, &change_out, "v1"),
        disabled_pg()
    );
    secret.write(&[("config.yaml", v1.as_bytes())]).unwrap();
    let mut d = Daemon::start(&secret.file("config.yaml"), &[]);
    wait_file(&keep_out, "keep one").await;
    wait_file(&change_out, "v1 one").await;

    // A new version: `change` has a new command, `added` is new, `keep` is the same.
    let v2 = format!(
        "configs:\n{}{}{}{}",
        fprintf_config("keep", &src, &keep_out, "keep"),
        fprintf_config("change", &src, &change_out, "v2"),
        fprintf_config("added", &src, &added_out, "added"),
        disabled_pg()
    );
    secret.write(&[("config.yaml", v2.as_bytes())]).unwrap();
    wait_file(&change_out, "v2 one").await;
    wait_file(&added_out, "added one").await;
    d.wait_for_log("config file changed; applied", 1).await;
    let log = d.log();
    assert!(log.contains("restarted=change"), "{log}");
    assert!(log.contains("started=added"), "{log}");
    assert_eq!(
        runs_of(&log, "keep"),
        1,
        "an unchanged config must not re-run:\n{log}"
    );

    // An invalid version (a misspelt field) is rejected, naming the field; nothing changes.
    let v3 = v2.replace(
        "    debounce: 100ms\n",
        "    debounce: 100ms\n    transacton: false\n",
    );
    secret.write(&[("config.yaml", v3.as_bytes())]).unwrap();
    d.wait_for_log("config file rejected", 1).await;
    // An invalid literal DSN (with a password in it) is rejected too, naming the field.
    let v4 = format!(
        "{v2}  broken:\n    destination: {{driver: postgres, dsn: {}}}\n    commands: [{{command: SELECT 1}}]\n",
        yq(&format!("host=127.0.0.1 password={DSN_PW} nosuchkeyword=1"))
    );
    secret.write(&[("config.yaml", v4.as_bytes())]).unwrap();
    d.wait_for_log("config file rejected", 2).await;
    let log = d.log();
    assert!(log.contains("transacton"), "{log}");
    assert!(log.contains("destination.dsn"), "{log}");
    assert!(
        log.contains("config \\\"broken\\\"") || log.contains("config \"broken\""),
        "{log}"
    );

    // The configs in force (v2) keep running and follow their sources.
    std::fs::write(&src_path, r#"{"v": "two"}"#).unwrap();
    wait_file(&change_out, "v2 two").await;
    wait_file(&keep_out, "keep two").await;
    wait_file(&added_out, "added two").await;

    // A valid version again, without `keep`: it stops; the others stay.
    let v5 = format!(
        "configs:\n{}{}{}",
        fprintf_config("change", &src, &change_out, "v2"),
        fprintf_config("added", &src, &added_out, "added"),
        disabled_pg()
    );
    secret.write(&[("config.yaml", v5.as_bytes())]).unwrap();
    d.wait_for_log("stopped=keep", 1).await;
    let keep_runs = runs_of(&d.log(), "keep");
    std::fs::write(&src_path, r#"{"v": "three"}"#).unwrap();
    wait_file(&change_out, "v2 three").await;
    wait_file(&added_out, "added three").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = d.stop();
    assert_eq!(
        runs_of(&log, "keep"),
        keep_runs,
        "a removed config must not run:\n{log}"
    );
    assert_eq!(std::fs::read_to_string(&keep_out).unwrap(), "keep two");
    assert_eq!(runs_of(&log, "change"), 4, "{log}");
    assert_no_secret(&log, &[DSN_PW]);
}
