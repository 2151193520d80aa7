//! Resolves a claim name to its Secret through the Kubernetes API, with a short cache.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};

use crate::contract::{CLAIM_GROUP, CLAIM_VERSION};
use crate::decision::ClaimLookup;

/// The claim kinds, in lookup order, with their plural resource names.
pub const CLAIM_KINDS: [(&str, &str); 2] = [
    ("DatabaseClaim", "databaseclaims"),
    ("DbRoleClaim", "dbroleclaims"),
];

/// How the resolver caches and bounds its lookups.
#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// How long a found Secret name is reused.
    pub positive_ttl: Duration,
    /// How long "not found" / "no secretName" is reused (short: the user is probably fixing it).
    pub negative_ttl: Duration,
    /// The whole lookup (both kinds) must finish within this, well inside the webhook timeout.
    pub timeout: Duration,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            positive_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
        }
    }
}

/// Cache entries above this are pruned of expired ones (bounds memory under many namespaces).
const CACHE_PRUNE_AT: usize = 10_000;

/// Looks up DatabaseClaim, then DbRoleClaim, in the request's namespace.
pub struct ClaimResolver {
    client: kube::Client,
    config: ResolverConfig,
    cache: Mutex<HashMap<(String, String), (Instant, ClaimLookup)>>,
}

impl ClaimResolver {
    pub fn new(client: kube::Client, config: ResolverConfig) -> Self {
        ClaimResolver {
            client,
            config,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Resolves `claim` in `namespace`; failures are returned as [`ClaimLookup::Unavailable`]
    /// and never cached.
    pub async fn resolve(&self, namespace: &str, claim: &str) -> ClaimLookup {
        let key = (namespace.to_string(), claim.to_string());
        if let Some(hit) = self.cached(&key) {
            metrics::counter!("dbwebhook_claim_cache_hits_total").increment(1);
            return hit;
        }
        let result = match tokio::time::timeout(self.config.timeout, self.fetch(namespace, claim))
            .await
        {
            Ok(r) => r,
            Err(_) => ClaimLookup::Unavailable(format!(
                "the Kubernetes API did not answer within {:?}; retry, and check the API server and the webhook's RBAC",
                self.config.timeout
            )),
        };
        let ttl = match &result {
            ClaimLookup::Found(_) => Some(self.config.positive_ttl),
            ClaimLookup::NotFound | ClaimLookup::NoSecretName { .. } => {
                Some(self.config.negative_ttl)
            }
            ClaimLookup::Unavailable(_) => None,
        };
        if let Some(ttl) = ttl
            && let Ok(mut cache) = self.cache.lock()
        {
            let now = Instant::now();
            if cache.len() >= CACHE_PRUNE_AT {
                cache.retain(|_, (expires, _)| *expires > now);
            }
            cache.insert(key, (now + ttl, result.clone()));
        }
        result
    }

    fn cached(&self, key: &(String, String)) -> Option<ClaimLookup> {
        let cache = self.cache.lock().ok()?;
        let (expires, value) = cache.get(key)?;
        (*expires > Instant::now()).then(|| value.clone())
    }

    async fn fetch(&self, namespace: &str, claim: &str) -> ClaimLookup {
        for (kind, plural) in CLAIM_KINDS {
            let gvk = GroupVersionKind::gvk(CLAIM_GROUP, CLAIM_VERSION, kind);
            let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), namespace, &resource);
            match api.get_opt(claim).await {
                Ok(Some(obj)) => {
                    return match obj
                        .data
                        .get("spec")
                        .and_then(|s| s.get("secretName"))
                        .and_then(|s| s.as_str())
                        .filter(|s| !s.is_empty())
                    {
                        Some(secret) => ClaimLookup::Found(secret.to_string()),
                        None => ClaimLookup::NoSecretName {
                            kind: kind.to_string(),
                        },
                    };
                }
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(kind, namespace, claim, error = %e, "claim lookup failed");
                    return ClaimLookup::Unavailable(format!(
                        "reading {kind} failed ({}); retry, and check that the webhook's ServiceAccount may get {plural}.{CLAIM_GROUP}",
                        short_kube_error(&e)
                    ));
                }
            }
        }
        ClaimLookup::NotFound
    }
}

/// A one-line description of a kube error (API status code and reason when there is one).
fn short_kube_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => format!("HTTP {} {}", status.code, status.reason),
        other => other.to_string(),
    }
}
