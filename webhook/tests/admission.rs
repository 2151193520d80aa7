//! Fixture AdmissionReviews through the admission layer: each patch is applied and the
//! result checked as a valid Pod; a second pass is a no-op; bad bodies get clear answers.
//! Claims are served by a local HTTP server that returns real Kubernetes API JSON.

mod common;

use axum::body::to_bytes;
use axum::http::StatusCode;
use common::*;
use dbwebhook::admission::{AppState, review as admit};
use dbwebhook::claims::ResolverConfig;
use dbwebhook::config::{InjectConfig, SidecarMode};
use serde_json::{Value, json};

async fn setup(config: InjectConfig) -> (FakeApi, AppState) {
    let (api, client, _) = start_fake_api().await;
    api.add_claim("myapp", "DatabaseClaim", "myapp-db", Some("myapp-db-creds"));
    api.add_claim("myapp", "DbRoleClaim", "reader", Some("reader-creds"));
    api.add_claim("myapp", "DatabaseClaim", "pending", None);
    let state = app_state(config, client, ResolverConfig::default());
    (api, state)
}

/// Sends a review through the admission layer; returns HTTP status and JSON body (or text).
async fn send(state: &AppState, body: &[u8]) -> (StatusCode, Result<Value, String>) {
    let (response, _) = admit(state, body).await;
    let status = response.status();
    let bytes = to_bytes(response.into_body(), 64 << 20).await.unwrap();
    let parsed =
        serde_json::from_slice(&bytes).map_err(|_| String::from_utf8_lossy(&bytes).into_owned());
    (status, parsed)
}

async fn send_review(state: &AppState, review: &Value) -> Value {
    let (status, body) = send(state, &serde_json::to_vec(review).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let body = body.expect("response is JSON");
    assert_eq!(
        body["apiVersion"], review["apiVersion"],
        "same apiVersion back"
    );
    assert_eq!(body["kind"], "AdmissionReview");
    assert_eq!(
        body["response"]["uid"], review["request"]["uid"],
        "response carries the request uid"
    );
    body
}

/// Applies the response's patch to the pod, checks validity and that a second pass is a no-op.
async fn apply_and_check(state: &AppState, review: &Value, response: &Value) -> Value {
    assert_eq!(response["response"]["allowed"], true, "{response}");
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    let patch = response_patch(response).expect("response has a patch");
    for op in &patch.0 {
        assert!(
            matches!(op, json_patch::PatchOperation::Add(_)),
            "only add operations: {op:?}"
        );
    }
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).expect("patch applies");
    assert_valid_pod(&pod);
    // Everything the pod had is still there.
    let before = &review["request"]["object"];
    assert_eq!(
        pod["spec"]["containers"][pod["spec"]["containers"].as_array().unwrap().len() - 1]["name"],
        before["spec"]["containers"][before["spec"]["containers"].as_array().unwrap().len() - 1]["name"]
    );
    assert_eq!(
        pod["metadata"]["ownerReferences"],
        before["metadata"]["ownerReferences"]
    );
    // Idempotent: the webhook's own output yields no patch.
    let mut again = review.clone();
    again["request"]["object"] = pod.clone();
    again["request"]["uid"] = json!("second-pass");
    let second = send_review(state, &again).await;
    assert_eq!(second["response"]["allowed"], true);
    assert!(
        second["response"].get("patch").is_none(),
        "second pass must not patch: {second}"
    );
    pod
}

#[tokio::test]
async fn deployment_pod_with_generate_name_gets_native_proxy_first() {
    let (_api, state) = setup(InjectConfig::default()).await;
    let pod = deployment_pod(proxy_labels());
    assert!(pod["metadata"].get("namespace").is_none());
    let review = review("uid-1", "CREATE", "myapp", pod);
    let response = send_review(&state, &review).await;
    let pod = apply_and_check(&state, &review, &response).await;
    assert_eq!(init_names(&pod), ["dbproxy"]);
    let proxy = &pod["spec"]["initContainers"][0];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 9432);
    assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(
        proxy["env"][0],
        json!({"name": "DBPROXY_CREDENTIAL", "value": "/dbproxy/uri_dsn.txt"})
    );
    assert_eq!(
        proxy["volumeMounts"][0],
        json!({"name": "dbproxydsn", "mountPath": "/dbproxy", "readOnly": true})
    );
    let sc = &proxy["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(
        proxy["resources"]["requests"],
        json!({"cpu": "10m", "memory": "32Mi"})
    );
    assert_eq!(
        pod["spec"]["volumes"],
        json!([{"name": "dbproxydsn", "secret": {"secretName": "myapp-db-creds"}}])
    );
    assert_eq!(
        pod["metadata"]["annotations"]["persistance.atlas.infoblox.com/injected-dbproxy"],
        "true"
    );
    // The annotation key's `/` is escaped in the patch path.
    let patch = response_patch(&response).unwrap();
    let text = serde_json::to_string(&patch).unwrap();
    assert!(
        !text.contains("\"/spec\""),
        "targeted adds, not a whole-spec replace: {text}"
    );
}

#[tokio::test]
async fn existing_init_containers_keep_their_order_after_the_sidecars() {
    let (_api, state) = setup(InjectConfig::default()).await;
    let mut labels = proxy_labels();
    labels["persistance.atlas.infoblox.com/dsnexec"] = json!("enabled");
    labels["persistance.atlas.infoblox.com/dsnexec-config"] = json!("myapp-dsnexec");
    let mut pod = deployment_pod(labels);
    pod["spec"]["initContainers"] = json!([
        {"name": "migrate", "image": "migrate:1", "args": ["up"]},
        {"name": "seed", "image": "seed:1"}
    ]);
    pod["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    pod["metadata"]["annotations"] = json!({"prometheus.io/scrape": "true"});
    let review = review("uid-2", "CREATE", "myapp", pod);
    let response = send_review(&state, &review).await;
    let pod = apply_and_check(&state, &review, &response).await;
    assert_eq!(init_names(&pod), ["dbproxy", "dsnexec", "migrate", "seed"]);
    let dsnexec = &pod["spec"]["initContainers"][1];
    assert_eq!(
        dsnexec["args"],
        json!(["run", "--config-file", "/var/run/dsn-exec/config.yaml"])
    );
    assert_eq!(dsnexec["startupProbe"]["httpGet"]["port"], 9433);
    let volumes: Vec<_> = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(volumes, ["data", "dbproxydsn", "db-dsn", "dsnexec-config"]);
    assert_eq!(
        pod["spec"]["volumes"][3]["secret"]["secretName"],
        "myapp-dsnexec"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["persistance.atlas.infoblox.com/injected-dsnexec"],
        "true"
    );
}

#[tokio::test]
async fn dsnexec_config_annotation_overrides_the_label() {
    let (_api, state) = setup(InjectConfig::default()).await;
    let labels = json!({
        "persistance.atlas.infoblox.com/claim": "myapp-db",
        "persistance.atlas.infoblox.com/dsnexec": "enabled",
        "persistance.atlas.infoblox.com/dsnexec-config": "from-label"
    });
    let mut pod = deployment_pod(labels);
    pod["metadata"]["annotations"] =
        json!({"infoblox.com/dsnexec-config-secret": "from-annotation"});
    let review = review("uid-3", "CREATE", "myapp", pod);
    let response = send_review(&state, &review).await;
    let pod = apply_and_check(&state, &review, &response).await;
    assert_eq!(init_names(&pod), ["dsnexec"]);
    let config_volume = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "dsnexec-config")
        .unwrap()
        .clone();
    assert_eq!(config_volume["secret"]["secretName"], "from-annotation");
    assert_eq!(
        pod["spec"]["volumes"][0],
        json!({"name": "db-dsn", "secret": {"secretName": "myapp-db-creds"}})
    );
    assert!(
        pod["metadata"]["annotations"]
            .get("persistance.atlas.infoblox.com/injected-dbproxy")
            .is_none()
    );
}

#[tokio::test]
async fn db_role_claim_and_secret_name_annotation_resolve() {
    let (api, state) = setup(InjectConfig::default()).await;
    let mut labels = proxy_labels();
    labels["persistance.atlas.infoblox.com/claim"] = json!("reader");
    let review1 = review("uid-4", "CREATE", "myapp", deployment_pod(labels));
    let response = send_review(&state, &review1).await;
    let pod = apply_and_check(&state, &review1, &response).await;
    assert_eq!(
        pod["spec"]["volumes"][0]["secret"]["secretName"],
        "reader-creds"
    );

    // Naming the Secret on the pod needs no claim at all (and no API call).
    let before = api.request_count();
    let mut labels = proxy_labels();
    labels["persistance.atlas.infoblox.com/claim"] = json!("no-such-claim");
    let mut pod = deployment_pod(labels);
    pod["metadata"]["annotations"] =
        json!({"persistance.atlas.infoblox.com/secret-name": "hand-made"});
    let review2 = review("uid-5", "CREATE", "myapp", pod);
    let response = send_review(&state, &review2).await;
    let pod = apply_and_check(&state, &review2, &response).await;
    assert_eq!(
        pod["spec"]["volumes"][0]["secret"]["secretName"],
        "hand-made"
    );
    assert_eq!(
        api.request_count(),
        before,
        "no lookup when the Secret is named"
    );
}

#[tokio::test]
async fn container_mode_puts_the_proxy_first_with_a_blocking_post_start() {
    let config = InjectConfig {
        sidecar_mode: SidecarMode::Container,
        ..InjectConfig::default()
    };
    let (_api, state) = setup(config).await;
    let review = review("uid-6", "CREATE", "myapp", deployment_pod(proxy_labels()));
    let response = send_review(&state, &review).await;
    let pod = apply_and_check(&state, &review, &response).await;
    assert!(pod["spec"].get("initContainers").is_none());
    assert_eq!(pod["spec"]["containers"][0]["name"], "dbproxy");
    assert_eq!(pod["spec"]["containers"][1]["name"], "app");
    assert_eq!(
        pod["spec"]["containers"][0]["lifecycle"]["postStart"]["exec"]["command"],
        json!(["dbproxy", "wait"])
    );
}

#[tokio::test]
async fn dry_run_gets_the_same_patch() {
    let (_api, state) = setup(InjectConfig::default()).await;
    let plain = review("uid-7", "CREATE", "myapp", deployment_pod(proxy_labels()));
    let mut dry = plain.clone();
    dry["request"]["dryRun"] = json!(true);
    let a = send_review(&state, &plain).await;
    let b = send_review(&state, &dry).await;
    assert_eq!(a["response"]["patch"], b["response"]["patch"]);
    apply_and_check(&state, &dry, &b).await;
}

#[tokio::test]
async fn per_pod_resource_overrides() {
    let (_api, state) = setup(InjectConfig::default()).await;
    let mut pod = deployment_pod(proxy_labels());
    pod["metadata"]["annotations"] = json!({
        "persistance.atlas.infoblox.com/dbproxy-cpu-request": "50m",
        "persistance.atlas.infoblox.com/dbproxy-memory-limit": "256Mi",
        "persistance.atlas.infoblox.com/dbproxy-cpu-limit": "1"
    });
    let review1 = review("uid-8", "CREATE", "myapp", pod.clone());
    let response = send_review(&state, &review1).await;
    let out = apply_and_check(&state, &review1, &response).await;
    assert_eq!(
        out["spec"]["initContainers"][0]["resources"],
        json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}})
    );
    pod["metadata"]["annotations"]["persistance.atlas.infoblox.com/dbproxy-cpu-request"] =
        json!("lots");
    let bad = send_review(&state, &review("uid-9", "CREATE", "myapp", pod)).await;
    assert_eq!(bad["response"]["allowed"], false);
    let msg = bad["response"]["status"]["message"].as_str().unwrap();
    assert!(
        msg.contains("dbproxy-cpu-request") && msg.contains("lots"),
        "{msg}"
    );
}

/// Requests that must pass through unchanged.
#[tokio::test]
async fn skips_are_allowed_without_patch() {
    let (api, state) = setup(InjectConfig::default()).await;
    let mut injected = deployment_pod(proxy_labels());
    injected["metadata"]["annotations"] =
        json!({"persistance.atlas.infoblox.com/injected-dbproxy": "true"});
    let mut own_container = deployment_pod(proxy_labels());
    own_container["spec"]["initContainers"] =
        json!([{"name": "dbproxy", "image": "mine", "restartPolicy": "Always"}]);
    let mut other_class = proxy_labels();
    other_class["persistance.atlas.infoblox.com/class"] = json!("gold");
    let mut disabled = proxy_labels();
    disabled["persistance.atlas.infoblox.com/dbproxy"] = json!("disabled");
    let mut not_pod = review("s6", "CREATE", "myapp", deployment_pod(proxy_labels()));
    not_pod["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let cases = [
        (
            "already injected",
            review("s1", "CREATE", "myapp", injected),
        ),
        (
            "own dbproxy container",
            review("s2", "CREATE", "myapp", own_container),
        ),
        (
            "UPDATE",
            review("s3", "UPDATE", "myapp", deployment_pod(proxy_labels())),
        ),
        (
            "class mismatch",
            review("s4", "CREATE", "myapp", deployment_pod(other_class)),
        ),
        (
            "not enabled",
            review("s5", "CREATE", "myapp", deployment_pod(disabled)),
        ),
        ("not a pod", not_pod),
        (
            "no claim label",
            review("s7", "CREATE", "myapp", deployment_pod(json!({"app": "x"}))),
        ),
    ];
    let before = api.request_count();
    for (name, r) in cases {
        let response = send_review(&state, &r).await;
        assert_eq!(response["response"]["allowed"], true, "{name}");
        assert!(
            response["response"].get("patch").is_none(),
            "{name}: {response}"
        );
    }
    assert_eq!(api.request_count(), before, "skips never call the API");
}

#[tokio::test]
async fn class_label_selects_the_configured_class() {
    let config = InjectConfig {
        class: "gold".into(),
        ..InjectConfig::default()
    };
    let (_api, state) = setup(config).await;
    // No class label means "default", which is not ours.
    let r = send_review(
        &state,
        &review("c1", "CREATE", "myapp", deployment_pod(proxy_labels())),
    )
    .await;
    assert!(r["response"].get("patch").is_none());
    let mut labels = proxy_labels();
    labels["persistance.atlas.infoblox.com/class"] = json!("gold");
    let r = send_review(
        &state,
        &review("c2", "CREATE", "myapp", deployment_pod(labels)),
    )
    .await;
    assert!(r["response"].get("patch").is_some());
}

#[tokio::test]
async fn denials_name_the_claim_and_what_to_do() {
    let (_api, state) = setup(InjectConfig::default()).await;
    let mut missing = proxy_labels();
    missing["persistance.atlas.infoblox.com/claim"] = json!("ghost");
    let r = send_review(
        &state,
        &review("d1", "CREATE", "myapp", deployment_pod(missing)),
    )
    .await;
    assert_eq!(r["response"]["allowed"], false);
    let msg = r["response"]["status"]["message"].as_str().unwrap();
    assert!(
        msg.contains("\"ghost\"") && msg.contains("\"myapp\"") && msg.contains("create the claim"),
        "{msg}"
    );

    let mut pending = proxy_labels();
    pending["persistance.atlas.infoblox.com/claim"] = json!("pending");
    let r = send_review(
        &state,
        &review("d2", "CREATE", "myapp", deployment_pod(pending)),
    )
    .await;
    assert_eq!(r["response"]["allowed"], false);
    let msg = r["response"]["status"]["message"].as_str().unwrap();
    assert!(
        msg.contains("DatabaseClaim \"pending\"") && msg.contains("spec.secretName"),
        "{msg}"
    );

    let mut no_config = proxy_labels();
    no_config["persistance.atlas.infoblox.com/dsnexec"] = json!("enabled");
    let r = send_review(
        &state,
        &review("d3", "CREATE", "myapp", deployment_pod(no_config)),
    )
    .await;
    assert_eq!(r["response"]["allowed"], false);
    assert!(
        r["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("dsnexec-config")
    );

    let mut clash = deployment_pod(proxy_labels());
    clash["spec"]["volumes"] = json!([{"name": "dbproxydsn", "emptyDir": {}}]);
    let r = send_review(&state, &review("d4", "CREATE", "myapp", clash)).await;
    assert_eq!(r["response"]["allowed"], false);
    assert!(
        r["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("dbproxydsn")
    );
}

#[tokio::test]
async fn an_existing_volume_for_the_same_secret_is_reused() {
    let (_api, state) = setup(InjectConfig::default()).await;
    let mut pod = deployment_pod(proxy_labels());
    pod["spec"]["volumes"] =
        json!([{"name": "dbproxydsn", "secret": {"secretName": "myapp-db-creds"}}]);
    let review = review("v1", "CREATE", "myapp", pod);
    let response = send_review(&state, &review).await;
    let pod = apply_and_check(&state, &review, &response).await;
    assert_eq!(pod["spec"]["volumes"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn unknown_pod_fields_survive_the_patch() {
    let (_api, state) = setup(InjectConfig::default()).await;
    let mut pod = deployment_pod(proxy_labels());
    pod["spec"]["futureField"] = json!({"x": 1});
    pod["spec"]["containers"][0]["futureContainerField"] = json!(true);
    let review = review("u1", "CREATE", "myapp", pod);
    let response = send_review(&state, &review).await;
    let patch = response_patch(&response).unwrap();
    let mut out = review["request"]["object"].clone();
    json_patch::patch(&mut out, &patch).unwrap();
    assert_eq!(out["spec"]["futureField"], json!({"x": 1}));
    assert_eq!(out["spec"]["containers"][0]["futureContainerField"], true);
}

#[tokio::test]
async fn garbage_bodies_get_clear_answers() {
    let (_api, state) = setup(InjectConfig::default()).await;
    for body in [
        &b""[..],
        b"not json",
        b"{\"apiVersion\":",
        b"[1,2,3]",
        &[0xff, 0xfe, 0x00][..],
    ] {
        let (status, text) = send(&state, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
        let text = text.unwrap_err();
        assert!(text.contains("AdmissionReview"), "{text}");
    }
    // JSON without a request.
    let (status, text) = send(
        &state,
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.unwrap_err().contains("no request"));
    // A malformed request that still has a uid gets an AdmissionReview answer with that uid,
    // and the error never echoes input values (a pod's env may hold a password).
    let body = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "bad-1", "operation": "hunter2-secret-value", "kind": 7}
    });
    let (status, parsed) = send(&state, &serde_json::to_vec(&body).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let parsed = parsed.unwrap();
    assert_eq!(parsed["response"]["uid"], "bad-1");
    assert_eq!(parsed["response"]["allowed"], false);
    assert!(!parsed.to_string().contains("hunter2"), "{parsed}");
}
