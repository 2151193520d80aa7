//! `dbwebhook inject`: the admission mutation applied offline to YAML manifests (GitOps).
//!
//! Documents that need no change are printed byte for byte as they came; changed documents
//! are re-serialised keeping the original key order.

use std::collections::HashMap;

use serde_json::Value;
use serde_yaml_ng::Value as Yaml;

use crate::config::InjectConfig;
use crate::decision::{self, ClaimLookup, Decision, PodRequest};
use crate::error::WebhookError;

/// Parses one `--claim-secret CLAIM=SECRET` value.
pub fn parse_claim_secret(arg: &str) -> Result<(String, String), WebhookError> {
    match arg.split_once('=') {
        Some((claim, secret)) if !claim.is_empty() && !secret.is_empty() => {
            Ok((claim.to_string(), secret.to_string()))
        }
        _ => Err(WebhookError::Config {
            setting: "--claim-secret".into(),
            reason: format!("{arg:?} is not CLAIM=SECRET"),
        }),
    }
}

/// What happened to the manifests, for the summary on stderr.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InjectReport {
    /// `Kind/name` of every workload that got sidecars.
    pub injected: Vec<String>,
    /// Documents in the input.
    pub documents: usize,
}

/// Where the pod template lives in a workload of this kind.
fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// One document of a multi-document stream: its `---` line (if any) and its text.
struct Document<'a> {
    separator: Option<&'a str>,
    body: String,
}

fn is_separator(line: &str) -> bool {
    let line = line.trim_end_matches(['\r', '\n']);
    line == "---" || line.starts_with("--- ") || line.starts_with("---\t")
}

fn split_documents(input: &str) -> Vec<Document<'_>> {
    let mut docs = vec![Document {
        separator: None,
        body: String::new(),
    }];
    for line in input.split_inclusive('\n') {
        if is_separator(line) {
            docs.push(Document {
                separator: Some(line),
                body: String::new(),
            });
        } else if let Some(last) = docs.last_mut() {
            last.body.push_str(line);
        }
    }
    docs
}

/// Rewrites every matching workload in `input`; `claims` maps claim names to Secret names.
pub fn inject_manifests(
    input: &str,
    config: &InjectConfig,
    claims: &HashMap<String, String>,
) -> Result<(String, InjectReport), WebhookError> {
    let mut out = String::with_capacity(input.len() * 2);
    let mut report = InjectReport::default();
    for (index, doc) in split_documents(input).into_iter().enumerate() {
        let number = index + 1;
        if let Some(sep) = doc.separator {
            out.push_str(sep);
        }
        let changed = inject_document(&doc.body, number, config, claims, &mut report)?;
        match changed {
            Some(text) => {
                // Keep the document's leading comments; comments inside it are lost.
                for line in doc.body.split_inclusive('\n') {
                    let trimmed = line.trim();
                    if !(trimmed.is_empty() || trimmed.starts_with('#')) {
                        break;
                    }
                    out.push_str(line);
                }
                out.push_str(&text);
            }
            None => out.push_str(&doc.body),
        }
        report.documents += 1;
    }
    Ok((out, report))
}

/// `Some(new text)` when the document changed.
fn inject_document(
    body: &str,
    number: usize,
    config: &InjectConfig,
    claims: &HashMap<String, String>,
    report: &mut InjectReport,
) -> Result<Option<String>, WebhookError> {
    let manifest_error = |reason: String| WebhookError::Manifest {
        document: number,
        reason,
    };
    let yaml: Yaml = serde_yaml_ng::from_str(body)
        .map_err(|e| manifest_error(format!("not valid YAML: {e}")))?;
    if yaml.is_null() {
        return Ok(None);
    }
    let mut json: Value = serde_yaml_ng::from_value(yaml.clone())
        .map_err(|e| manifest_error(format!("cannot be represented as JSON: {e}")))?;
    let Some(kind) = json.get("kind").and_then(Value::as_str).map(str::to_string) else {
        return Ok(None);
    };
    let Some(pointer) = template_pointer(&kind) else {
        return Ok(None);
    };
    let name = json
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let namespace = json
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let what = format!("{kind}/{name}");
    let Some(template) = json.pointer_mut(pointer) else {
        return Ok(None);
    };
    let request = PodRequest {
        operation: "CREATE",
        group: "",
        kind: "Pod",
        sub_resource: None,
        namespace: Some(&namespace),
        object: Some(template),
    };
    let lookup =
        decision::claim_to_resolve(&request, config).map(|(_, claim)| match claims.get(&claim) {
            Some(secret) => ClaimLookup::Found(secret.clone()),
            None => ClaimLookup::Unavailable(format!(
                "no API server is asked offline: pass --claim-secret {claim}=SECRET"
            )),
        });
    match decision::decide(&request, config, lookup.as_ref()) {
        Decision::Skip(_) => Ok(None),
        Decision::Deny { message, .. } => Err(manifest_error(format!("{what}: {message}"))),
        Decision::Inject { patch, .. } => {
            json_patch::patch(template, &patch)
                .map_err(|e| manifest_error(format!("{what}: patch failed: {e}")))?;
            report.injected.push(what);
            let ordered = ordered_like(&json, Some(&yaml));
            let text = serde_yaml_ng::to_string(&ordered)
                .map_err(|e| manifest_error(format!("cannot write YAML: {e}")))?;
            Ok(Some(text))
        }
    }
}

/// Converts `new` to YAML, keeping the key order of `old` where it has the same keys
/// (serde_json sorts keys); new maps start with `name`.
fn ordered_like(new: &Value, old: Option<&Yaml>) -> Yaml {
    match new {
        Value::Object(map) => {
            let old_map = old.and_then(Yaml::as_mapping);
            let mut out = serde_yaml_ng::Mapping::new();
            let mut keys: Vec<&String> = Vec::new();
            if let Some(old_map) = old_map {
                for k in old_map.keys().filter_map(Yaml::as_str) {
                    if let Some((key, _)) = map.get_key_value(k) {
                        keys.push(key);
                    }
                }
            } else if let Some((key, _)) = map.get_key_value("name") {
                keys.push(key);
            }
            for k in map.keys() {
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
            for k in keys {
                let old_value = old_map.and_then(|m| m.get(k.as_str()));
                out.insert(Yaml::String(k.clone()), ordered_like(&map[k], old_value));
            }
            Yaml::Mapping(out)
        }
        Value::Array(items) => {
            let old_items = old.and_then(Yaml::as_sequence);
            let same_len = old_items.map(|o| o.len()) == Some(items.len());
            Yaml::Sequence(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| {
                        let by_name = item.get("name").and_then(Value::as_str).and_then(|n| {
                            old_items?
                                .iter()
                                .find(|o| o.get("name").and_then(Yaml::as_str) == Some(n))
                        });
                        let by_index = if same_len {
                            old_items.and_then(|o| o.get(i))
                        } else {
                            None
                        };
                        ordered_like(item, by_name.or(by_index))
                    })
                    .collect(),
            )
        }
        scalar => serde_yaml_ng::to_value(scalar).unwrap_or(Yaml::Null),
    }
}
