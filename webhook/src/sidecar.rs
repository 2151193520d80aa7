//! The container and volume specs the webhook adds, as raw JSON ready for a JSON Patch.

use serde_json::{Map, Value, json};

use crate::config::{InjectConfig, ResourceSpec, SidecarMode};
use crate::contract::*;

/// Restricted Pod Security Standard: non-root, read-only root fs, no privilege escalation,
/// no capabilities, the runtime's default seccomp profile.
fn security_context(config: &InjectConfig) -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": config.run_as_user,
        "runAsGroup": config.run_as_user,
        "readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false,
        "capabilities": { "drop": ["ALL"] },
        "seccompProfile": { "type": "RuntimeDefault" },
    })
}

/// `resources` from a spec, leaving out what is unset.
fn resources(spec: &ResourceSpec) -> Value {
    let pick = |pairs: [(&str, &Option<String>); 2]| -> Map<String, Value> {
        pairs
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), Value::String(v.clone()?))))
            .collect()
    };
    let requests = pick([("cpu", &spec.cpu_request), ("memory", &spec.memory_request)]);
    let limits = pick([("cpu", &spec.cpu_limit), ("memory", &spec.memory_limit)]);
    let mut out = Map::new();
    if !requests.is_empty() {
        out.insert("requests".into(), Value::Object(requests));
    }
    if !limits.is_empty() {
        out.insert("limits".into(), Value::Object(limits));
    }
    Value::Object(out)
}

fn http_probe(path: &str, port: u16, period: u32, failures: u32) -> Value {
    json!({
        "httpGet": { "path": path, "port": port },
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 1,
    })
}

/// Probes and lifecycle shared by both sidecars. Liveness checks `/healthz` only, which never
/// touches the database (a database outage must not restart the sidecar).
fn add_common(container: &mut Map<String, Value>, config: &InjectConfig, port: u16) {
    container.insert("imagePullPolicy".into(), json!(config.image_pull_policy));
    container.insert("securityContext".into(), security_context(config));
    container.insert("livenessProbe".into(), http_probe("/healthz", port, 10, 3));
    container.insert("readinessProbe".into(), http_probe("/readyz", port, 5, 3));
    if config.sidecar_mode == SidecarMode::Native {
        container.insert("restartPolicy".into(), json!("Always"));
        // Up to 5 minutes for the first DSN to appear (a new claim's Secret may lag the pod).
        container.insert("startupProbe".into(), http_probe("/readyz", port, 1, 300));
    }
}

/// The dbproxy container: reads the DSN from the mounted Secret, listens on localhost:5432.
pub fn proxy_container(config: &InjectConfig, resources_spec: &ResourceSpec) -> Value {
    let mut c = Map::new();
    c.insert("name".into(), json!(DBPROXY_CONTAINER));
    c.insert("image".into(), json!(config.proxy_image));
    c.insert(
        "env".into(),
        json!([{ "name": DBPROXY_CREDENTIAL_ENV, "value": DBPROXY_CREDENTIAL_PATH }]),
    );
    c.insert(
        "ports".into(),
        json!([{ "name": "dbproxy-ops", "containerPort": DBPROXY_OPS_PORT, "protocol": "TCP" }]),
    );
    c.insert(
        "volumeMounts".into(),
        json!([{ "name": DBPROXY_VOLUME, "mountPath": DBPROXY_MOUNT, "readOnly": true }]),
    );
    c.insert("resources".into(), resources(resources_spec));
    add_common(&mut c, config, DBPROXY_OPS_PORT);
    if config.sidecar_mode == SidecarMode::Container {
        // The kubelet starts the next container only after postStart returns: the app
        // starts once the proxy is ready.
        c.insert(
            "lifecycle".into(),
            json!({ "postStart": { "exec": { "command": ["dbproxy", "wait"] } } }),
        );
    }
    Value::Object(c)
}

/// The dsnexec container: runs its config's commands whenever the DSN Secret changes.
pub fn dsnexec_container(config: &InjectConfig, resources_spec: &ResourceSpec) -> Value {
    let mut c = Map::new();
    c.insert("name".into(), json!(DSNEXEC_CONTAINER));
    c.insert("image".into(), json!(config.dsnexec_image));
    c.insert(
        "args".into(),
        json!(["run", "--config-file", DSNEXEC_CONFIG_FILE]),
    );
    c.insert(
        "ports".into(),
        json!([{ "name": "dsnexec-ops", "containerPort": DSNEXEC_OPS_PORT, "protocol": "TCP" }]),
    );
    c.insert(
        "volumeMounts".into(),
        json!([
            { "name": DSNEXEC_DSN_VOLUME, "mountPath": DSNEXEC_DSN_MOUNT, "readOnly": true },
            { "name": DSNEXEC_CONFIG_VOLUME, "mountPath": DSNEXEC_CONFIG_MOUNT, "readOnly": true },
        ]),
    );
    c.insert("resources".into(), resources(resources_spec));
    add_common(&mut c, config, DSNEXEC_OPS_PORT);
    Value::Object(c)
}

/// A volume projecting a whole Secret (never subPath: subPath mounts never update).
pub fn secret_volume(name: &str, secret: &str) -> Value {
    json!({ "name": name, "secret": { "secretName": secret } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_proxy_has_restart_policy_and_startup_probe() {
        let config = InjectConfig::default();
        let c = proxy_container(&config, &config.proxy_resources);
        assert_eq!(c["restartPolicy"], "Always");
        assert_eq!(c["startupProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(c["startupProbe"]["httpGet"]["port"], 9432);
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert!(c.get("lifecycle").is_none());
        assert_eq!(c["resources"]["requests"]["cpu"], "10m");
        assert!(c["resources"]["limits"].get("cpu").is_none());
    }

    #[test]
    fn container_mode_proxy_waits_in_post_start() {
        let config = InjectConfig {
            sidecar_mode: SidecarMode::Container,
            ..InjectConfig::default()
        };
        let c = proxy_container(&config, &config.proxy_resources);
        assert!(c.get("restartPolicy").is_none());
        assert!(c.get("startupProbe").is_none());
        assert_eq!(
            c["lifecycle"]["postStart"]["exec"]["command"],
            json!(["dbproxy", "wait"])
        );
    }
}
