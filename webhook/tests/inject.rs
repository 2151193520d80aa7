//! `dbwebhook inject` on YAML manifests: every workload kind, multi-document streams,
//! untouched documents printed byte for byte, idempotency, and the binary's CLI.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};

use common::assert_valid_pod;
use dbwebhook::config::InjectConfig;
use dbwebhook::inject::{inject_manifests, parse_claim_secret};
use serde_json::Value;

const LABELS: &str = r#"
        persistance.atlas.infoblox.com/claim: app-db
        persistance.atlas.infoblox.com/dbproxy: enabled"#;

fn workload(kind: &str, api: &str) -> String {
    let pod_spec = format!(
        "metadata:\n      labels:{LABELS}\n    spec:\n      containers:\n        - name: app\n          image: app:1\n"
    );
    match kind {
        "Pod" => format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels:{}\nspec:\n  containers:\n    - name: app\n      image: app:1\n",
            LABELS.replace("\n        ", "\n    ")
        ),
        "CronJob" => format!(
            "apiVersion: {api}\nkind: CronJob\nmetadata:\n  name: c\nspec:\n  schedule: '* * * * *'\n  jobTemplate:\n    spec:\n      template:\n        {}",
            pod_spec.replace("\n", "\n    ")
        ),
        _ => format!(
            "apiVersion: {api}\nkind: {kind}\nmetadata:\n  name: w\nspec:\n  template:\n    {pod_spec}"
        ),
    }
}

fn claims() -> HashMap<String, String> {
    HashMap::from([("app-db".to_string(), "app-db-secret".to_string())])
}

fn template_of(doc: &Value) -> Value {
    match doc["kind"].as_str().unwrap() {
        "Pod" => doc.clone(),
        "CronJob" => doc["spec"]["jobTemplate"]["spec"]["template"].clone(),
        _ => doc["spec"]["template"].clone(),
    }
}

#[test]
fn every_workload_kind_is_injected_and_idempotent() {
    let config = InjectConfig::default();
    for (kind, api) in [
        ("Pod", "v1"),
        ("Deployment", "apps/v1"),
        ("StatefulSet", "apps/v1"),
        ("DaemonSet", "apps/v1"),
        ("ReplicaSet", "apps/v1"),
        ("Job", "batch/v1"),
        ("CronJob", "batch/v1"),
    ] {
        let input = workload(kind, api);
        let (out, report) = inject_manifests(&input, &config, &claims()).unwrap();
        assert_eq!(report.injected.len(), 1, "{kind}: {out}");
        let doc: Value = serde_yaml_ng::from_str(&out).unwrap();
        assert_eq!(doc["kind"], kind);
        let mut template = template_of(&doc);
        assert_eq!(
            template["spec"]["initContainers"][0]["name"], "dbproxy",
            "{kind}"
        );
        assert_eq!(
            template["spec"]["volumes"][0]["secret"]["secretName"],
            "app-db-secret"
        );
        if kind != "Pod" {
            template["apiVersion"] = "v1".into();
            template["kind"] = "Pod".into();
        }
        assert_valid_pod(&template);
        // A second run leaves the output as it is.
        let (again, report) = inject_manifests(&out, &config, &claims()).unwrap();
        assert!(report.injected.is_empty(), "{kind}");
        assert_eq!(again, out, "{kind}");
    }
}

#[test]
fn untouched_documents_are_printed_byte_for_byte() {
    let config = InjectConfig::default();
    let service = "# keep this comment\napiVersion: v1\nkind: Service\nmetadata:\n  name: s   # trailing\nspec:\n  ports: [{port: 80}]\n";
    let unlabelled = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: plain}\nspec:\n  template:\n    metadata: {labels: {app: x}}\n    spec: {containers: [{name: a, image: a}]}\n";
    let input = format!(
        "{service}---\n{}--- # separator comment\n{unlabelled}---\n",
        workload("Deployment", "apps/v1")
    );
    let (out, report) = inject_manifests(&input, &config, &claims()).unwrap();
    assert_eq!(report.documents, 4);
    assert_eq!(report.injected, ["Deployment/w"]);
    assert!(out.starts_with(service), "{out}");
    assert!(
        out.contains(&format!("--- # separator comment\n{unlabelled}---\n")),
        "{out}"
    );
    // Key order of the changed document is kept (apiVersion, kind, metadata, spec).
    let changed = out.split("---\n").nth(1).unwrap();
    assert!(
        changed.starts_with("apiVersion: apps/v1\nkind: Deployment\nmetadata:"),
        "{changed}"
    );
}

#[test]
fn unresolved_claims_and_bad_input_are_clear_errors() {
    let config = InjectConfig::default();
    let err = inject_manifests(&workload("Deployment", "apps/v1"), &config, &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--claim-secret app-db=SECRET") && err.contains("document 1"),
        "{err}"
    );
    let err = inject_manifests("a: [unclosed\n", &config, &claims())
        .unwrap_err()
        .to_string();
    assert!(err.contains("document 1") && err.contains("YAML"), "{err}");
    assert!(parse_claim_secret("a=b").is_ok());
    for bad in ["a", "=b", "a="] {
        assert!(parse_claim_secret(bad).is_err(), "{bad}");
    }
}

/// The binary reads stdin with `-f -`, resolves `--claim-secret`, honours `--class`.
#[test]
fn cli_reads_stdin_and_prints_the_result() {
    let bin = env!("CARGO_BIN_EXE_dbwebhook");
    let run = |args: &[&str], input: &str| {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let input = workload("Deployment", "apps/v1");
    let out = run(
        &[
            "inject",
            "-f",
            "-",
            "--claim-secret",
            "app-db=app-db-secret",
        ],
        &input,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("name: dbproxy") && stdout.contains("secretName: app-db-secret"),
        "{stdout}"
    );
    // Another class: nothing to do, output identical to input.
    let out = run(&["inject", "-f", "-", "--class", "gold"], &input);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), input);
    // Missing claim mapping: non-zero exit with the fix in the message.
    let out = run(&["inject", "-f", "-"], &input);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--claim-secret"));
}

#[test]
fn the_example_manifests_inject() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/webhook/deployment.yaml"
    );
    let input = std::fs::read_to_string(path).unwrap();
    let (out, report) = inject_manifests(
        &input,
        &InjectConfig::default(),
        &HashMap::from([("myapp-db".to_string(), "myapp-db-secret".to_string())]),
    )
    .unwrap();
    assert_eq!(report.injected, ["Deployment/myapp", "Job/myapp-migrate"]);
    assert!(out.starts_with("# An application"), "leading comments kept");
}
