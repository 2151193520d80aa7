//! Builds targeted JSON Patch `add` operations against the raw pod JSON.
//!
//! The pod is never re-serialised through typed structs: their deserialisers drop fields
//! they do not know (new Kubernetes fields, `restartPolicy` on init containers in old
//! versions), and a whole-pod replacement would silently lose them.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use serde_json::{Map, Value};

/// Collects what to add to one pod, then turns it into patch operations that work whether
/// or not the arrays and maps being added to exist yet.
#[derive(Debug)]
pub struct PodPatch<'a> {
    pod: &'a Value,
    first: Vec<(&'static str, Vec<Value>)>,
    volumes: Vec<Value>,
    annotations: Vec<(String, String)>,
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    // from_tokens escapes `~` as `~0` and `/` as `~1` (RFC 6901).
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    })
}

impl<'a> PodPatch<'a> {
    /// Starts a patch for `pod` (the raw `request.object`).
    pub fn new(pod: &'a Value) -> Self {
        PodPatch {
            pod,
            first: Vec::new(),
            volumes: Vec::new(),
            annotations: Vec::new(),
        }
    }

    /// Places `containers` at the front of `spec.<field>` (`initContainers` or `containers`),
    /// in the given order.
    pub fn insert_first(&mut self, field: &'static str, containers: Vec<Value>) {
        if containers.is_empty() {
            return;
        }
        match self.first.iter_mut().find(|(f, _)| *f == field) {
            Some((_, list)) => list.extend(containers),
            None => self.first.push((field, containers)),
        }
    }

    /// Appends a volume to `spec.volumes`.
    pub fn add_volume(&mut self, volume: Value) {
        self.volumes.push(volume);
    }

    /// Sets an annotation the pod does not have yet.
    pub fn add_annotation(&mut self, key: &str, value: &str) {
        self.annotations.push((key.to_string(), value.to_string()));
    }

    /// The operations, in an order where each one's parent exists when it is applied.
    pub fn finish(self) -> Patch {
        let mut ops = Vec::new();
        let spec = self.pod.get("spec");
        for (field, containers) in self.first {
            match spec.and_then(|s| s.get(field)).and_then(Value::as_array) {
                Some(_) => {
                    for (i, c) in containers.into_iter().enumerate() {
                        ops.push(add(&["spec", field, &i.to_string()], c));
                    }
                }
                None => ops.push(add(&["spec", field], Value::Array(containers))),
            }
        }
        if !self.volumes.is_empty() {
            match spec
                .and_then(|s| s.get("volumes"))
                .and_then(Value::as_array)
            {
                Some(_) => {
                    for v in self.volumes {
                        ops.push(add(&["spec", "volumes", "-"], v));
                    }
                }
                None => ops.push(add(&["spec", "volumes"], Value::Array(self.volumes))),
            }
        }
        if !self.annotations.is_empty() {
            let metadata = self.pod.get("metadata").filter(|m| m.is_object());
            let existing = metadata
                .and_then(|m| m.get("annotations"))
                .and_then(Value::as_object);
            if existing.is_some() {
                for (k, v) in self.annotations {
                    ops.push(add(&["metadata", "annotations", &k], Value::String(v)));
                }
            } else {
                let map: Map<String, Value> = self
                    .annotations
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect();
                if metadata.is_some() {
                    ops.push(add(&["metadata", "annotations"], Value::Object(map)));
                } else {
                    let mut meta = Map::new();
                    meta.insert("annotations".into(), Value::Object(map));
                    ops.push(add(&["metadata"], Value::Object(meta)));
                }
            }
        }
        Patch(ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn missing_arrays_and_maps_are_added_whole() {
        let pod = json!({"metadata": {}, "spec": {"containers": [{"name": "app"}]}});
        let mut p = PodPatch::new(&pod);
        p.insert_first(
            "initContainers",
            vec![json!({"name": "a"}), json!({"name": "b"})],
        );
        p.add_volume(json!({"name": "v"}));
        p.add_annotation("x.io/y", "true");
        let patch = p.finish();
        let text = serde_json::to_string(&patch).unwrap();
        assert!(text.contains(r#""path":"/spec/initContainers""#), "{text}");
        assert!(text.contains(r#""path":"/spec/volumes""#), "{text}");
        assert!(text.contains(r#""path":"/metadata/annotations""#), "{text}");
        let mut out = pod.clone();
        json_patch::patch(&mut out, &patch).unwrap();
        assert_eq!(out["spec"]["initContainers"][1]["name"], "b");
        assert_eq!(out["metadata"]["annotations"]["x.io/y"], "true");
    }

    #[test]
    fn existing_arrays_get_targeted_adds_and_keys_are_escaped() {
        let pod = json!({
            "metadata": {"annotations": {"keep": "me"}},
            "spec": {"initContainers": [{"name": "migrate"}], "containers": [], "volumes": [{"name": "data"}]}
        });
        let mut p = PodPatch::new(&pod);
        p.insert_first(
            "initContainers",
            vec![json!({"name": "a"}), json!({"name": "b"})],
        );
        p.add_volume(json!({"name": "v"}));
        p.add_annotation("x.io/y~z", "true");
        let patch = p.finish();
        let text = serde_json::to_string(&patch).unwrap();
        assert!(text.contains("/metadata/annotations/x.io~1y~0z"), "{text}");
        assert!(text.contains("/spec/volumes/-"), "{text}");
        let mut out = pod.clone();
        json_patch::patch(&mut out, &patch).unwrap();
        let names: Vec<_> = out["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a", "b", "migrate"]);
        assert_eq!(out["metadata"]["annotations"]["keep"], "me");
        assert_eq!(out["metadata"]["annotations"]["x.io/y~z"], "true");
    }
}
