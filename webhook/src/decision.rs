//! The pure decision: from an admission request, the configuration and the resolved claim,
//! whether to skip, deny, or which patch to apply. No I/O here; table-tested.

use json_patch::Patch;
use serde_json::Value;

use crate::config::{InjectConfig, ResourceSpec, SidecarMode, is_quantity};
use crate::contract::*;
use crate::patch::PodPatch;
use crate::sidecar;

/// The parts of an admission request the decision reads. `object` is the raw pod JSON.
#[derive(Debug, Clone)]
pub struct PodRequest<'a> {
    /// `CREATE`, `UPDATE`, `DELETE` or `CONNECT`.
    pub operation: &'a str,
    /// API group of the object's kind (`""` for core).
    pub group: &'a str,
    /// Kind of the object (`Pod`).
    pub kind: &'a str,
    /// Subresource (`status`, `ephemeralcontainers`, ...) if any.
    pub sub_resource: Option<&'a str>,
    /// `request.namespace`: the pod's own metadata often has none yet.
    pub namespace: Option<&'a str>,
    /// The raw object.
    pub object: Option<&'a Value>,
}

/// Why a request passes through unchanged (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    NotPod,
    NotCreate,
    NoObject,
    NoClaimLabel,
    ClassMismatch,
    NotEnabled,
    AlreadyInjected,
}

impl SkipReason {
    /// The metrics label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotPod => "not_pod",
            SkipReason::NotCreate => "not_create",
            SkipReason::NoObject => "no_object",
            SkipReason::NoClaimLabel => "no_claim_label",
            SkipReason::ClassMismatch => "class_mismatch",
            SkipReason::NotEnabled => "not_enabled",
            SkipReason::AlreadyInjected => "already_injected",
        }
    }
}

/// Why a pod is refused (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    NoNamespace,
    ClaimNotFound,
    ClaimWithoutSecret,
    ClaimLookupFailed,
    NoDsnexecConfig,
    VolumeConflict,
    BadOverride,
}

impl DenyReason {
    /// The metrics label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NoNamespace => "no_namespace",
            DenyReason::ClaimNotFound => "claim_not_found",
            DenyReason::ClaimWithoutSecret => "claim_without_secret",
            DenyReason::ClaimLookupFailed => "claim_lookup_failed",
            DenyReason::NoDsnexecConfig => "no_dsnexec_config",
            DenyReason::VolumeConflict => "volume_conflict",
            DenyReason::BadOverride => "bad_override",
        }
    }
}

/// Which sidecar a patch adds (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sidecar {
    Dbproxy,
    Dsnexec,
}

impl Sidecar {
    /// Container name and metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Sidecar::Dbproxy => DBPROXY_CONTAINER,
            Sidecar::Dsnexec => DSNEXEC_CONTAINER,
        }
    }
}

/// What the webhook answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Allow unchanged.
    Skip(SkipReason),
    /// Allow with this patch, which adds these sidecars.
    Inject {
        patch: Patch,
        sidecars: Vec<Sidecar>,
    },
    /// Refuse the pod; the message tells the user what to do.
    Deny { reason: DenyReason, message: String },
}

/// What the claim resolved to (found by the API lookup or given with `--claim-secret`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimLookup {
    /// The claim's `spec.secretName`.
    Found(String),
    /// The claim exists (of this kind) but has no `spec.secretName`.
    NoSecretName { kind: String },
    /// Neither a DatabaseClaim nor a DbRoleClaim of that name exists in the namespace.
    NotFound,
    /// The lookup could not be done; the reason says why and what to do.
    Unavailable(String),
}

/// What a labelled pod asks for, before the claim is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub namespace: String,
    pub claim: String,
    /// The Secret named on the pod with [`ANNOTATION_SECRET_NAME`]; no lookup needed.
    pub secret_override: Option<String>,
    pub proxy: bool,
    pub dsnexec: bool,
}

fn labels(pod: &Value) -> Option<&serde_json::Map<String, Value>> {
    pod.get("metadata")?.get("labels")?.as_object()
}

fn annotations(pod: &Value) -> Option<&serde_json::Map<String, Value>> {
    pod.get("metadata")?.get("annotations")?.as_object()
}

fn label<'p>(pod: &'p Value, key: &str) -> Option<&'p str> {
    labels(pod)?.get(key)?.as_str()
}

fn annotation<'p>(pod: &'p Value, key: &str) -> Option<&'p str> {
    annotations(pod)?.get(key)?.as_str()
}

/// Names of all containers and init containers.
fn container_names(pod: &Value) -> impl Iterator<Item = &str> {
    ["initContainers", "containers"]
        .into_iter()
        .filter_map(|f| pod.get("spec")?.get(f)?.as_array())
        .flatten()
        .filter_map(|c| c.get("name")?.as_str())
}

/// Already injected: our annotation says so, or a container of that name exists.
fn has_sidecar(pod: &Value, annotation_key: &str, container: &str) -> bool {
    annotation(pod, annotation_key) == Some("true") || container_names(pod).any(|n| n == container)
}

/// Decides whether the request concerns a pod this webhook should inject, and what it wants.
/// `Err` is a skip (or, for a pod without any namespace, a denial).
pub fn wanted(req: &PodRequest<'_>, config: &InjectConfig) -> Result<Wanted, Decision> {
    let skip = |r| Err(Decision::Skip(r));
    if !req.group.is_empty() || req.kind != "Pod" || req.sub_resource.is_some() {
        return skip(SkipReason::NotPod);
    }
    if req.operation != "CREATE" {
        return skip(SkipReason::NotCreate);
    }
    let Some(pod) = req.object.filter(|o| o.is_object()) else {
        return skip(SkipReason::NoObject);
    };
    let Some(claim) = label(pod, LABEL_CLAIM).filter(|c| !c.is_empty()) else {
        return skip(SkipReason::NoClaimLabel);
    };
    if label(pod, LABEL_CLASS).unwrap_or(DEFAULT_CLASS) != config.class {
        return skip(SkipReason::ClassMismatch);
    }
    let proxy_enabled = label(pod, LABEL_DBPROXY) == Some(ENABLED);
    let dsnexec_enabled = label(pod, LABEL_DSNEXEC) == Some(ENABLED);
    if !proxy_enabled && !dsnexec_enabled {
        return skip(SkipReason::NotEnabled);
    }
    let proxy = proxy_enabled && !has_sidecar(pod, ANNOTATION_INJECTED_DBPROXY, DBPROXY_CONTAINER);
    let dsnexec =
        dsnexec_enabled && !has_sidecar(pod, ANNOTATION_INJECTED_DSNEXEC, DSNEXEC_CONTAINER);
    if !proxy && !dsnexec {
        return skip(SkipReason::AlreadyInjected);
    }
    let namespace = req
        .namespace
        .filter(|n| !n.is_empty())
        .or_else(|| pod.get("metadata")?.get("namespace")?.as_str())
        .filter(|n| !n.is_empty());
    let Some(namespace) = namespace else {
        return Err(Decision::Deny {
            reason: DenyReason::NoNamespace,
            message: format!(
                "pod with claim {claim:?} has no namespace in the request; cannot resolve the claim"
            ),
        });
    };
    Ok(Wanted {
        namespace: namespace.to_string(),
        claim: claim.to_string(),
        secret_override: annotation(pod, ANNOTATION_SECRET_NAME)
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        proxy,
        dsnexec,
    })
}

/// The claim the edge must look up before calling [`decide`], if any: `(namespace, claim)`.
pub fn claim_to_resolve(req: &PodRequest<'_>, config: &InjectConfig) -> Option<(String, String)> {
    let w = wanted(req, config).ok()?;
    w.secret_override
        .is_none()
        .then_some((w.namespace, w.claim))
}

/// The whole decision. `lookup` is the result of resolving [`claim_to_resolve`]'s claim
/// (ignored when the pod names its Secret itself).
pub fn decide(
    req: &PodRequest<'_>,
    config: &InjectConfig,
    lookup: Option<&ClaimLookup>,
) -> Decision {
    let w = match wanted(req, config) {
        Ok(w) => w,
        Err(d) => return d,
    };
    // `wanted` returned Ok, so the object is there.
    let Some(pod) = req.object else {
        return Decision::Skip(SkipReason::NoObject);
    };
    let secret = match (&w.secret_override, lookup) {
        (Some(s), _) => s.clone(),
        (None, Some(ClaimLookup::Found(s))) => s.clone(),
        (None, Some(ClaimLookup::NoSecretName { kind })) => {
            return deny(
                DenyReason::ClaimWithoutSecret,
                format!(
                    "{kind} {:?} in namespace {:?} has no spec.secretName yet: wait for db-controller to \
                     set it or set it on the claim, or name the Secret on the pod with annotation {ANNOTATION_SECRET_NAME}",
                    w.claim, w.namespace
                ),
            );
        }
        (None, Some(ClaimLookup::NotFound)) => {
            return deny(
                DenyReason::ClaimNotFound,
                format!(
                    "no DatabaseClaim or DbRoleClaim named {:?} in namespace {:?} (from label {LABEL_CLAIM}): \
                     create the claim, fix the label, or name the Secret on the pod with annotation {ANNOTATION_SECRET_NAME}",
                    w.claim, w.namespace
                ),
            );
        }
        (None, Some(ClaimLookup::Unavailable(why))) => {
            return deny(
                DenyReason::ClaimLookupFailed,
                format!(
                    "cannot resolve claim {:?} in namespace {:?}: {why}",
                    w.claim, w.namespace
                ),
            );
        }
        (None, None) => {
            return deny(
                DenyReason::ClaimLookupFailed,
                format!(
                    "claim {:?} in namespace {:?} was not resolved",
                    w.claim, w.namespace
                ),
            );
        }
    };
    build_patch(pod, config, &w, &secret)
}

fn deny(reason: DenyReason, message: String) -> Decision {
    Decision::Deny { reason, message }
}

/// Applies the pod's resource override annotations to the configured defaults.
fn resources_for(
    pod: &Value,
    container: &str,
    base: &ResourceSpec,
) -> Result<ResourceSpec, String> {
    let mut spec = base.clone();
    for suffix in ["cpu-request", "cpu-limit", "memory-request", "memory-limit"] {
        let key = format!("{ANNOTATION_RESOURCE_PREFIX}{container}-{suffix}");
        if let Some(value) = annotation(pod, &key) {
            if !is_quantity(value) {
                return Err(format!(
                    "annotation {key}: {value:?} is not a Kubernetes quantity (like 10m, 0.5, 32Mi, 1Gi)"
                ));
            }
            if let Some(field) = spec.field_mut(suffix) {
                *field = Some(value.to_string());
            }
        }
    }
    Ok(spec)
}

/// Whether the pod already has a volume called `name`: `Ok(true)` if it projects `secret`
/// (reuse it), `Ok(false)` if absent, `Err` if it is something else.
fn existing_volume(pod: &Value, name: &str, secret: &str) -> Result<bool, String> {
    let volumes = pod
        .get("spec")
        .and_then(|s| s.get("volumes"))
        .and_then(Value::as_array);
    let Some(v) = volumes
        .into_iter()
        .flatten()
        .find(|v| v.get("name").and_then(Value::as_str) == Some(name))
    else {
        return Ok(false);
    };
    let existing = v
        .get("secret")
        .and_then(|s| s.get("secretName"))
        .and_then(Value::as_str);
    if existing == Some(secret) {
        Ok(true)
    } else {
        Err(format!(
            "the pod already has a volume named {name:?} that is not Secret {secret:?}; \
             the webhook needs that name for the sidecar: rename or remove the pod's volume"
        ))
    }
}

fn build_patch(pod: &Value, config: &InjectConfig, w: &Wanted, secret: &str) -> Decision {
    let mut patch = PodPatch::new(pod);
    let mut containers = Vec::new();
    let mut sidecars = Vec::new();
    let mut volumes: Vec<(&str, String)> = Vec::new();
    if w.proxy {
        let res = match resources_for(pod, DBPROXY_CONTAINER, &config.proxy_resources) {
            Ok(r) => r,
            Err(m) => return deny(DenyReason::BadOverride, m),
        };
        containers.push(sidecar::proxy_container(config, &res));
        sidecars.push(Sidecar::Dbproxy);
        volumes.push((DBPROXY_VOLUME, secret.to_string()));
    }
    if w.dsnexec {
        let config_secret = annotation(pod, ANNOTATION_DSNEXEC_CONFIG)
            .filter(|s| !s.is_empty())
            .or_else(|| label(pod, LABEL_DSNEXEC_CONFIG).filter(|s| !s.is_empty()));
        let Some(config_secret) = config_secret else {
            return deny(
                DenyReason::NoDsnexecConfig,
                format!(
                    "dsnexec is enabled but no config Secret is named: set label {LABEL_DSNEXEC_CONFIG} \
                     or annotation {ANNOTATION_DSNEXEC_CONFIG} to the Secret holding config.yaml"
                ),
            );
        };
        let res = match resources_for(pod, DSNEXEC_CONTAINER, &config.dsnexec_resources) {
            Ok(r) => r,
            Err(m) => return deny(DenyReason::BadOverride, m),
        };
        containers.push(sidecar::dsnexec_container(config, &res));
        sidecars.push(Sidecar::Dsnexec);
        volumes.push((DSNEXEC_DSN_VOLUME, secret.to_string()));
        volumes.push((DSNEXEC_CONFIG_VOLUME, config_secret.to_string()));
    }
    for (name, secret) in &volumes {
        match existing_volume(pod, name, secret) {
            Ok(true) => {}
            Ok(false) => patch.add_volume(sidecar::secret_volume(name, secret)),
            Err(m) => return deny(DenyReason::VolumeConflict, m),
        }
    }
    let field = match config.sidecar_mode {
        SidecarMode::Native => "initContainers",
        SidecarMode::Container => "containers",
    };
    patch.insert_first(field, containers);
    for s in &sidecars {
        let key = match s {
            Sidecar::Dbproxy => ANNOTATION_INJECTED_DBPROXY,
            Sidecar::Dsnexec => ANNOTATION_INJECTED_DSNEXEC,
        };
        patch.add_annotation(key, "true");
    }
    Decision::Inject {
        patch: patch.finish(),
        sidecars,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value, annotations: Value) -> Value {
        json!({"metadata": {"generateName": "a-", "labels": labels, "annotations": annotations},
               "spec": {"containers": [{"name": "app", "image": "a"}]}})
    }

    fn req<'a>(op: &'a str, ns: Option<&'a str>, object: &'a Value) -> PodRequest<'a> {
        PodRequest {
            operation: op,
            group: "",
            kind: "Pod",
            sub_resource: None,
            namespace: ns,
            object: Some(object),
        }
    }

    /// (case, operation, labels, annotations, lookup, expected outcome)
    type Case = (
        &'static str,
        &'static str,
        Value,
        Value,
        Option<ClaimLookup>,
        &'static str,
    );

    #[test]
    fn decision_table() {
        let found = ClaimLookup::Found("s".into());
        let base = json!({LABEL_CLAIM: "c", LABEL_DBPROXY: ENABLED});
        let cases: Vec<Case> = vec![
            (
                "inject",
                "CREATE",
                base.clone(),
                json!({}),
                Some(found.clone()),
                "inject",
            ),
            (
                "update",
                "UPDATE",
                base.clone(),
                json!({}),
                Some(found.clone()),
                "skip:not_create",
            ),
            (
                "no claim",
                "CREATE",
                json!({LABEL_DBPROXY: ENABLED}),
                json!({}),
                None,
                "skip:no_claim_label",
            ),
            (
                "empty claim",
                "CREATE",
                json!({LABEL_CLAIM: "", LABEL_DBPROXY: ENABLED}),
                json!({}),
                None,
                "skip:no_claim_label",
            ),
            (
                "class default explicit",
                "CREATE",
                json!({LABEL_CLAIM: "c", LABEL_DBPROXY: ENABLED, LABEL_CLASS: "default"}),
                json!({}),
                Some(found.clone()),
                "inject",
            ),
            (
                "other class",
                "CREATE",
                json!({LABEL_CLAIM: "c", LABEL_DBPROXY: ENABLED, LABEL_CLASS: "gold"}),
                json!({}),
                None,
                "skip:class_mismatch",
            ),
            (
                "not enabled",
                "CREATE",
                json!({LABEL_CLAIM: "c", LABEL_DBPROXY: "true"}),
                json!({}),
                None,
                "skip:not_enabled",
            ),
            (
                "injected",
                "CREATE",
                base.clone(),
                json!({ANNOTATION_INJECTED_DBPROXY: "true"}),
                None,
                "skip:already_injected",
            ),
            (
                "not found",
                "CREATE",
                base.clone(),
                json!({}),
                Some(ClaimLookup::NotFound),
                "deny:claim_not_found",
            ),
            (
                "no secret",
                "CREATE",
                base.clone(),
                json!({}),
                Some(ClaimLookup::NoSecretName {
                    kind: "DbRoleClaim".into(),
                }),
                "deny:claim_without_secret",
            ),
            (
                "api down",
                "CREATE",
                base.clone(),
                json!({}),
                Some(ClaimLookup::Unavailable("x".into())),
                "deny:claim_lookup_failed",
            ),
            (
                "override",
                "CREATE",
                base.clone(),
                json!({ANNOTATION_SECRET_NAME: "direct"}),
                None,
                "inject",
            ),
            (
                "bad override",
                "CREATE",
                base.clone(),
                json!({"persistance.atlas.infoblox.com/dbproxy-memory-limit": "big"}),
                Some(found.clone()),
                "deny:bad_override",
            ),
            (
                "dsnexec no config",
                "CREATE",
                json!({LABEL_CLAIM: "c", LABEL_DSNEXEC: ENABLED}),
                json!({}),
                Some(found.clone()),
                "deny:no_dsnexec_config",
            ),
        ];
        let config = InjectConfig::default();
        for (name, op, labels, annotations, lookup, expected) in cases {
            let object = pod(labels, annotations);
            let d = decide(&req(op, Some("ns"), &object), &config, lookup.as_ref());
            let got = match &d {
                Decision::Skip(r) => format!("skip:{}", r.as_str()),
                Decision::Inject { .. } => "inject".to_string(),
                Decision::Deny { reason, .. } => format!("deny:{}", reason.as_str()),
            };
            assert_eq!(got, expected, "{name}: {d:?}");
        }
    }

    #[test]
    fn namespace_comes_from_the_request_then_the_pod() {
        let config = InjectConfig::default();
        let mut object = pod(json!({LABEL_CLAIM: "c", LABEL_DBPROXY: ENABLED}), json!({}));
        assert_eq!(
            claim_to_resolve(&req("CREATE", Some("req-ns"), &object), &config),
            Some(("req-ns".into(), "c".into()))
        );
        object["metadata"]["namespace"] = json!("pod-ns");
        assert_eq!(
            claim_to_resolve(&req("CREATE", None, &object), &config),
            Some(("pod-ns".into(), "c".into()))
        );
        object["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("namespace");
        assert!(matches!(
            decide(&req("CREATE", None, &object), &config, None),
            Decision::Deny {
                reason: DenyReason::NoNamespace,
                ..
            }
        ));
    }
}
