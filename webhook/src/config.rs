//! What the webhook injects: images, sidecar mode, resources, class (from flags or the chart).

use std::fmt;

use crate::contract::DEFAULT_CLASS;
use crate::error::WebhookError;

/// How the sidecars are added to the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SidecarMode {
    /// Kubernetes 1.29+: init containers with `restartPolicy: Always`, placed first, started
    /// before the app and stopped after it, so Jobs complete.
    Native,
    /// Older clusters: regular containers placed first; the proxy blocks in a postStart hook
    /// (`dbproxy wait`) until it is ready, which delays the start of the next containers.
    Container,
}

impl fmt::Display for SidecarMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SidecarMode::Native => "native",
            SidecarMode::Container => "container",
        })
    }
}

/// Resource requests and limits of one sidecar; `None` leaves the field out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResourceSpec {
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
}

impl ResourceSpec {
    /// Small defaults: oversized requests are the top complaint about injected proxies.
    pub fn sidecar_default() -> Self {
        ResourceSpec {
            cpu_request: Some("10m".into()),
            cpu_limit: None,
            memory_request: Some("32Mi".into()),
            memory_limit: Some("128Mi".into()),
        }
    }

    /// Checks every quantity so a typo fails at startup, not in every admitted pod.
    pub fn validate(&self, who: &str) -> Result<(), WebhookError> {
        for (field, value) in self.fields() {
            if let Some(v) = value
                && !is_quantity(v)
            {
                return Err(WebhookError::Config {
                    setting: format!("{who} {field}"),
                    reason: format!(
                        "{v:?} is not a Kubernetes quantity (like 10m, 0.5, 32Mi, 1Gi)"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The four fields with their annotation suffixes, in a fixed order.
    pub fn fields(&self) -> [(&'static str, &Option<String>); 4] {
        [
            ("cpu-request", &self.cpu_request),
            ("cpu-limit", &self.cpu_limit),
            ("memory-request", &self.memory_request),
            ("memory-limit", &self.memory_limit),
        ]
    }

    /// Mutable access by annotation suffix, for per-pod overrides.
    pub fn field_mut(&mut self, suffix: &str) -> Option<&mut Option<String>> {
        match suffix {
            "cpu-request" => Some(&mut self.cpu_request),
            "cpu-limit" => Some(&mut self.cpu_limit),
            "memory-request" => Some(&mut self.memory_request),
            "memory-limit" => Some(&mut self.memory_limit),
            _ => None,
        }
    }
}

/// Everything the decision needs besides the pod: the webhook's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct InjectConfig {
    /// Only pods of this class are injected (pods without a class label are `default`).
    pub class: String,
    pub sidecar_mode: SidecarMode,
    pub proxy_image: String,
    pub dsnexec_image: String,
    /// `Always`, `IfNotPresent` or `Never`.
    pub image_pull_policy: String,
    pub proxy_resources: ResourceSpec,
    pub dsnexec_resources: ResourceSpec,
    /// UID the sidecars run as; `runAsNonRoot` needs a numeric user when the image's is a name.
    pub run_as_user: i64,
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            class: DEFAULT_CLASS.into(),
            sidecar_mode: SidecarMode::Native,
            proxy_image: DEFAULT_PROXY_IMAGE.into(),
            dsnexec_image: DEFAULT_DSNEXEC_IMAGE.into(),
            image_pull_policy: "IfNotPresent".into(),
            proxy_resources: ResourceSpec::sidecar_default(),
            dsnexec_resources: ResourceSpec::sidecar_default(),
            run_as_user: 65532,
        }
    }
}

/// Default proxy image (the chart always sets one).
pub const DEFAULT_PROXY_IMAGE: &str = "ghcr.io/infobloxopen/dbproxy:latest";
/// Default dsnexec image (the chart always sets one).
pub const DEFAULT_DSNEXEC_IMAGE: &str = "ghcr.io/infobloxopen/dsnexec:latest";

/// Command-line flags shared by `serve` and `inject`.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// Only pods whose class label has this value are injected; pods without the label count as `default`.
    #[arg(long, env = "DBWEBHOOK_CLASS", default_value = DEFAULT_CLASS)]
    pub class: String,
    /// `native` (Kubernetes 1.29+) or `container` (older clusters).
    #[arg(long, env = "DBWEBHOOK_SIDECAR_MODE", value_enum, default_value_t = SidecarMode::Native)]
    pub sidecar_mode: SidecarMode,
    #[arg(long, env = "DBWEBHOOK_PROXY_IMAGE", default_value = DEFAULT_PROXY_IMAGE)]
    pub proxy_image: String,
    #[arg(long, env = "DBWEBHOOK_DSNEXEC_IMAGE", default_value = DEFAULT_DSNEXEC_IMAGE)]
    pub dsnexec_image: String,
    #[arg(
        long,
        env = "DBWEBHOOK_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    pub image_pull_policy: String,
    /// UID the sidecars run as.
    #[arg(long, env = "DBWEBHOOK_RUN_AS_USER", default_value_t = 65532)]
    pub run_as_user: i64,
    #[arg(long, default_value = "10m")]
    pub proxy_cpu_request: String,
    /// Empty for no CPU limit (the default: throttling a proxy adds latency to every query).
    #[arg(long, default_value = "")]
    pub proxy_cpu_limit: String,
    #[arg(long, default_value = "32Mi")]
    pub proxy_memory_request: String,
    #[arg(long, default_value = "128Mi")]
    pub proxy_memory_limit: String,
    #[arg(long, default_value = "10m")]
    pub dsnexec_cpu_request: String,
    #[arg(long, default_value = "")]
    pub dsnexec_cpu_limit: String,
    #[arg(long, default_value = "32Mi")]
    pub dsnexec_memory_request: String,
    #[arg(long, default_value = "128Mi")]
    pub dsnexec_memory_limit: String,
}

impl InjectArgs {
    /// Validates the flags into the configuration the decision uses.
    pub fn to_config(&self) -> Result<InjectConfig, WebhookError> {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let config = InjectConfig {
            class: self.class.clone(),
            sidecar_mode: self.sidecar_mode,
            proxy_image: self.proxy_image.clone(),
            dsnexec_image: self.dsnexec_image.clone(),
            image_pull_policy: self.image_pull_policy.clone(),
            proxy_resources: ResourceSpec {
                cpu_request: opt(&self.proxy_cpu_request),
                cpu_limit: opt(&self.proxy_cpu_limit),
                memory_request: opt(&self.proxy_memory_request),
                memory_limit: opt(&self.proxy_memory_limit),
            },
            dsnexec_resources: ResourceSpec {
                cpu_request: opt(&self.dsnexec_cpu_request),
                cpu_limit: opt(&self.dsnexec_cpu_limit),
                memory_request: opt(&self.dsnexec_memory_request),
                memory_limit: opt(&self.dsnexec_memory_limit),
            },
            run_as_user: self.run_as_user,
        };
        config.validate()?;
        Ok(config)
    }
}

impl InjectConfig {
    /// Rejects settings the API server would reject in every injected pod.
    pub fn validate(&self) -> Result<(), WebhookError> {
        if !matches!(
            self.image_pull_policy.as_str(),
            "Always" | "IfNotPresent" | "Never"
        ) {
            return Err(WebhookError::Config {
                setting: "--image-pull-policy".into(),
                reason: format!(
                    "{:?} is not one of Always, IfNotPresent, Never",
                    self.image_pull_policy
                ),
            });
        }
        for (setting, image) in [
            ("--proxy-image", &self.proxy_image),
            ("--dsnexec-image", &self.dsnexec_image),
        ] {
            if image.trim().is_empty() || image.chars().any(char::is_whitespace) {
                return Err(WebhookError::Config {
                    setting: setting.into(),
                    reason: format!("{image:?} is not an image reference"),
                });
            }
        }
        if self.class.is_empty() {
            return Err(WebhookError::Config {
                setting: "--class".into(),
                reason: "must not be empty".into(),
            });
        }
        if self.run_as_user <= 0 {
            return Err(WebhookError::Config {
                setting: "--run-as-user".into(),
                reason: "must be a non-root UID (> 0) for runAsNonRoot".into(),
            });
        }
        self.proxy_resources.validate("dbproxy")?;
        self.dsnexec_resources.validate("dsnexec")?;
        Ok(())
    }
}

/// Whether `s` is a Kubernetes resource quantity: a decimal number with an optional
/// binary (Ki..Ei), decimal (m, k, M..E) or exponent (e3) suffix.
pub fn is_quantity(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let dots = number.matches('.').count();
    if number.is_empty() || number == "." || dots > 1 {
        return false;
    }
    match suffix {
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T"
        | "P" | "E" => true,
        exp => {
            let Some(rest) = exp.strip_prefix(['e', 'E']) else {
                return false;
            };
            let rest = rest.strip_prefix(['+', '-']).unwrap_or(rest);
            !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for ok in ["10m", "0.5", "32Mi", "1Gi", "1", "1e3", ".5", "100k"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "ten", "10 m", "1.2.3", "Mi", "10MB", "1e", "."] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn bad_pull_policy_is_rejected() {
        let config = InjectConfig {
            image_pull_policy: "Sometimes".into(),
            ..InjectConfig::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("Sometimes"), "{err}");
    }
}
