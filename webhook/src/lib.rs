//! dbwebhook: a mutating admission webhook that injects dbproxy and dsnexec into labelled pods.

pub mod admission; // HTTPS server: decode AdmissionReview, call the decision, answer
pub mod claims; // claim -> Secret lookup through the Kubernetes API, cached
pub mod config; // what to inject: images, sidecar mode, resources, class
pub mod contract; // label, annotation, volume and port names shared with pods and sidecars
pub mod decision; // the pure decision: skip, deny or patch
pub mod error; // the crate's error enum
pub mod inject; // `dbwebhook inject`: the same mutation offline on YAML manifests
pub mod metrics; // Prometheus counters and latency
pub mod patch; // JSON Patch `add` operations against the raw pod JSON
pub mod sidecar; // the container and volume specs that get injected
pub mod tls; // certificate loading and reload on file change
