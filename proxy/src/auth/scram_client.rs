//! The client side of SCRAM-SHA-256 towards PostgreSQL, with the salted password cached per
//! credential generation: PBKDF2 (4096 rounds) runs once per password and salt, off the
//! async threads, instead of once per server login.

use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::{ProxyError, Result};

type HmacSha256 = Hmac<Sha256>;

/// Servers asking for more rounds than this are refused: a hostile or misconfigured server
/// must not make each login burn seconds of CPU.
const MAX_ITERATIONS: u32 = 1_000_000;
/// Longest nonce or salt we accept from a server.
const MAX_FIELD: usize = 1024;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// SASLprep as libpq applies it: fall back to the raw bytes when it does not apply.
pub fn normalize(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(p) => p.into_owned().into_bytes(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

/// PBKDF2-HMAC-SHA256 of a normalised password.
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

/// Salt, iteration count and the salted password derived from them.
type CachedKey = (Vec<u8>, u32, [u8; 32]);

/// The last salted password computed for one password; PostgreSQL keeps a role's salt until
/// its password changes, so every login of a generation hits this.
#[derive(Default)]
pub struct SaltedPasswordCache {
    entry: Mutex<Option<CachedKey>>,
}

impl std::fmt::Debug for SaltedPasswordCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SaltedPasswordCache(..)")
    }
}

impl SaltedPasswordCache {
    fn get(&self, salt: &[u8], iterations: u32) -> Option<[u8; 32]> {
        let entry = self.entry.lock().ok()?;
        match entry.as_ref() {
            Some((s, i, key)) if s == salt && *i == iterations => Some(*key),
            _ => None,
        }
    }

    fn put(&self, salt: &[u8], iterations: u32, key: [u8; 32]) {
        if let Ok(mut entry) = self.entry.lock() {
            *entry = Some((salt.to_vec(), iterations, key));
        }
    }
}

fn bad(why: &str) -> ProxyError {
    ProxyError::Protocol(format!("the server's SCRAM message is invalid: {why}"))
}

/// The GS2 channel-binding flag of a SCRAM login (RFC 5802 section 7), as libpq chooses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gs2Binding {
    /// `n`: the connection has no TLS (or binding is disabled): plain SCRAM-SHA-256.
    NotSupported,
    /// `y`: we could bind but the server did not offer SCRAM-SHA-256-PLUS (lets a server that
    /// does support it detect a downgrade).
    NotOffered,
    /// `p=tls-server-end-point`: SCRAM-SHA-256-PLUS bound to the hash of the server's
    /// certificate.
    TlsServerEndPoint(Vec<u8>),
}

impl Gs2Binding {
    /// The SASL mechanism name to announce.
    pub fn mechanism(&self) -> &'static str {
        match self {
            Gs2Binding::TlsServerEndPoint(_) => "SCRAM-SHA-256-PLUS",
            _ => "SCRAM-SHA-256",
        }
    }

    fn header(&self) -> &'static str {
        match self {
            Gs2Binding::NotSupported => "n,,",
            Gs2Binding::NotOffered => "y,,",
            Gs2Binding::TlsServerEndPoint(_) => "p=tls-server-end-point,,",
        }
    }

    /// The `c=` attribute: base64 of the GS2 header and, for `p`, the binding data.
    fn channel_attribute(&self) -> String {
        let mut raw = self.header().as_bytes().to_vec();
        if let Gs2Binding::TlsServerEndPoint(data) = self {
            raw.extend_from_slice(data);
        }
        B64.encode(raw)
    }
}

/// One SCRAM-SHA-256(-PLUS) login as a client.
pub struct ScramClient {
    password: Arc<[u8]>,
    cache: Arc<SaltedPasswordCache>,
    binding: Gs2Binding,
    client_first_bare: String,
    nonce: String,
    expected_server_signature: Option<[u8; 32]>,
}

impl ScramClient {
    /// `password` must already be normalised (see [`normalize`]). No channel binding.
    pub fn new(password: Arc<[u8]>, cache: Arc<SaltedPasswordCache>) -> Self {
        Self::with_binding(password, cache, Gs2Binding::NotSupported)
    }

    /// Like [`ScramClient::new`] with the channel binding chosen for this connection.
    pub fn with_binding(
        password: Arc<[u8]>,
        cache: Arc<SaltedPasswordCache>,
        binding: Gs2Binding,
    ) -> Self {
        let mut raw = [0u8; 18];
        rand::rng().fill_bytes(&mut raw);
        let nonce = B64.encode(raw);
        ScramClient {
            password,
            cache,
            binding,
            client_first_bare: format!("n=,r={nonce}"),
            nonce,
            expected_server_signature: None,
        }
    }

    /// The SASL mechanism this login uses.
    pub fn mechanism(&self) -> &'static str {
        self.binding.mechanism()
    }

    /// Whether this login is bound to the TLS channel (SCRAM-SHA-256-PLUS).
    pub fn is_bound(&self) -> bool {
        matches!(self.binding, Gs2Binding::TlsServerEndPoint(_))
    }

    /// The client-first-message.
    pub fn client_first(&self) -> Vec<u8> {
        format!("{}{}", self.binding.header(), self.client_first_bare).into_bytes()
    }

    /// Takes the server-first-message, returns the client-final-message.
    pub async fn client_final(&mut self, server_first: &[u8]) -> Result<Vec<u8>> {
        let text = std::str::from_utf8(server_first).map_err(|_| bad("not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in text.split(',') {
            if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            } else if let Some(v) = attr.strip_prefix("s=") {
                salt = Some(v);
            } else if let Some(v) = attr.strip_prefix("i=") {
                iterations = Some(v);
            }
        }
        let nonce = nonce.ok_or_else(|| bad("no nonce"))?;
        if nonce.len() > MAX_FIELD
            || !nonce.starts_with(&self.nonce)
            || nonce.len() == self.nonce.len()
        {
            return Err(bad("nonce does not extend ours"));
        }
        let salt = salt
            .filter(|s| s.len() <= MAX_FIELD)
            .ok_or_else(|| bad("no salt"))?;
        let salt = B64.decode(salt).map_err(|_| bad("salt is not base64"))?;
        let iterations: u32 = iterations
            .and_then(|i| i.parse().ok())
            .filter(|i| (1..=MAX_ITERATIONS).contains(i))
            .ok_or_else(|| bad("iteration count missing or out of range"))?;

        let salted = match self.cache.get(&salt, iterations) {
            Some(key) => key,
            None => {
                let password = self.password.clone();
                let salt_copy = salt.clone();
                let key = tokio::task::spawn_blocking(move || {
                    salted_password(&password, &salt_copy, iterations)
                })
                .await
                .map_err(|_| ProxyError::Protocol("SCRAM key derivation failed".into()))?;
                self.cache.put(&salt, iterations, key);
                key
            }
        };
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c={},r={nonce}", self.binding.channel_attribute());
        let auth_message = format!("{},{},{}", self.client_first_bare, text, without_proof);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let mut proof = [0u8; 32];
        for i in 0..32 {
            proof[i] = client_key[i] ^ signature[i];
        }
        let server_key = hmac(&salted, b"Server Key");
        self.expected_server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the server-final-message: the server must prove it knows the password too.
    pub fn verify_server_final(&self, server_final: &[u8]) -> Result<()> {
        let expected = self
            .expected_server_signature
            .ok_or_else(|| bad("out of order"))?;
        let text = std::str::from_utf8(server_final).map_err(|_| bad("not UTF-8"))?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(bad(&format!("server reported {e}")));
        }
        let v = text
            .split(',')
            .find_map(|a| a.strip_prefix("v="))
            .ok_or_else(|| bad("no verifier"))?;
        let v = B64.decode(v).map_err(|_| bad("verifier is not base64"))?;
        if v.as_slice() != expected.as_slice() {
            return Err(ProxyError::Protocol(
                "the server's SCRAM signature is wrong; is this the right server?".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scram_server::ScramVerifier;

    async fn login(
        cache: &Arc<SaltedPasswordCache>,
        verifier: &ScramVerifier,
        password: &str,
    ) -> bool {
        let mut client = ScramClient::new(normalize(password).into(), cache.clone());
        let mut exchange = verifier.exchange();
        let server_first = exchange.server_first(&client.client_first()).unwrap();
        let client_final = client.client_final(&server_first).await.unwrap();
        match exchange.server_final(&client_final).unwrap() {
            Some(server_final) => {
                client.verify_server_final(&server_final).unwrap();
                true
            }
            None => false,
        }
    }

    #[tokio::test]
    async fn logs_in_against_our_server_side_and_caches() {
        let verifier = ScramVerifier::new("p@ss w/ord:");
        let cache = Arc::new(SaltedPasswordCache::default());
        assert!(login(&cache, &verifier, "p@ss w/ord:").await);
        assert!(cache.entry.lock().unwrap().is_some());
        // Second login reuses the cached key and still succeeds.
        assert!(login(&cache, &verifier, "p@ss w/ord:").await);
        let cache = Arc::new(SaltedPasswordCache::default());
        assert!(!login(&cache, &verifier, "wrong").await);
    }

    #[test]
    fn gs2_headers_match_rfc_5802() {
        assert_eq!(Gs2Binding::NotSupported.channel_attribute(), "biws");
        assert_eq!(Gs2Binding::NotOffered.channel_attribute(), "eSws");
        let bound = Gs2Binding::TlsServerEndPoint(vec![1, 2, 3]);
        assert_eq!(bound.mechanism(), "SCRAM-SHA-256-PLUS");
        assert_eq!(
            B64.decode(bound.channel_attribute()).unwrap(),
            b"p=tls-server-end-point,,\x01\x02\x03".to_vec()
        );
        let client = ScramClient::with_binding(
            normalize("pw").into(),
            Arc::default(),
            Gs2Binding::TlsServerEndPoint(vec![9]),
        );
        assert!(client.is_bound());
        assert!(
            client
                .client_first()
                .starts_with(b"p=tls-server-end-point,,n=,r=")
        );
    }

    #[tokio::test]
    async fn rejects_bad_server_messages() {
        let cache = Arc::new(SaltedPasswordCache::default());
        let mut client = ScramClient::new(normalize("pw").into(), cache.clone());
        assert!(
            client
                .client_final(b"r=other,s=c2FsdA==,i=4096")
                .await
                .is_err()
        );
        let mut client = ScramClient::new(normalize("pw").into(), cache.clone());
        let n = client.nonce.clone();
        assert!(
            client
                .client_final(format!("r={n}x,s=c2FsdA==,i=999999999").as_bytes())
                .await
                .is_err()
        );
        let mut client = ScramClient::new(normalize("pw").into(), cache);
        let n = client.nonce.clone();
        client
            .client_final(format!("r={n}x,s=c2FsdA==,i=16").as_bytes())
            .await
            .unwrap();
        assert!(client.verify_server_final(b"v=AAAA").is_err());
    }
}
