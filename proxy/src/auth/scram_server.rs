//! The server side of SCRAM-SHA-256 (RFC 5802/7677), so clients on a non-loopback listener
//! prove they know `--client-password-file` without sending it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::{ProxyError, Result};

type HmacSha256 = Hmac<Sha256>;

/// PostgreSQL's default iteration count.
const ITERATIONS: u32 = 4096;

/// What the proxy keeps of the client password: the SCRAM keys, derived once at startup
/// (PBKDF2 is the expensive part; doing it per login would make logins slow and cheap to
/// flood).
pub struct ScramVerifier {
    salt: [u8; 16],
    iterations: u32,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(..)")
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// SASLprep as PostgreSQL applies it: fall back to the raw bytes when it does not apply.
fn normalize(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(p) => p.into_owned().into_bytes(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

impl ScramVerifier {
    /// Derives the keys for `password` with a fresh random salt.
    pub fn new(password: &str) -> Self {
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(&normalize(password), &salt, ITERATIONS, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let server_key = hmac(&salted, b"Server Key");
        ScramVerifier {
            salt,
            iterations: ITERATIONS,
            stored_key,
            server_key,
        }
    }

    /// Starts one client's exchange.
    pub fn exchange(&self) -> ScramExchange<'_> {
        ScramExchange {
            verifier: self,
            state: State::Initial,
        }
    }
}

enum State {
    Initial,
    SentServerFirst {
        gs2_header: String,
        client_first_bare: String,
        server_first: String,
        nonce: String,
    },
    Done,
}

/// One client's SCRAM conversation: `server_first` then `server_final`, in that order.
pub struct ScramExchange<'a> {
    verifier: &'a ScramVerifier,
    state: State,
}

fn rejected(why: &str) -> ProxyError {
    ProxyError::Protocol(format!("malformed SCRAM message: {why}"))
}

impl ScramExchange<'_> {
    /// Takes the client-first-message, returns the server-first-message.
    pub fn server_first(&mut self, client_first: &[u8]) -> Result<Vec<u8>> {
        if !matches!(self.state, State::Initial) {
            return Err(rejected("out of order"));
        }
        let text = std::str::from_utf8(client_first).map_err(|_| rejected("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = text
            .split_once(',')
            .ok_or_else(|| rejected("no GS2 header"))?;
        match flag {
            "n" | "y" => {}
            _ if flag.starts_with("p=") => {
                return Err(rejected("channel binding requested but not offered"));
            }
            _ => return Err(rejected("bad channel binding flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or_else(|| rejected("no GS2 header"))?;
        let gs2_header = format!("{flag},{authzid},");
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .ok_or_else(|| rejected("no nonce"))?;
        if client_nonce.is_empty()
            || !client_nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(rejected("bad nonce"));
        }
        let mut ours = [0u8; 18];
        rand::rng().fill_bytes(&mut ours);
        let nonce = format!("{client_nonce}{}", B64.encode(ours));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(self.verifier.salt),
            self.verifier.iterations
        );
        self.state = State::SentServerFirst {
            gs2_header,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok(server_first.into_bytes())
    }

    /// Takes the client-final-message; returns the server-final-message when the proof is
    /// right, and `Ok(None)` when the password is wrong.
    pub fn server_final(&mut self, client_final: &[u8]) -> Result<Option<Vec<u8>>> {
        let State::SentServerFirst {
            gs2_header,
            client_first_bare,
            server_first,
            nonce,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(rejected("out of order"));
        };
        let text = std::str::from_utf8(client_final).map_err(|_| rejected("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or_else(|| rejected("no proof"))?;
        let mut channel_binding = None;
        let mut client_nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                channel_binding = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                client_nonce = Some(v);
            }
        }
        if channel_binding != Some(B64.encode(gs2_header.as_bytes()).as_str()) {
            return Err(rejected("channel binding data does not match"));
        }
        if client_nonce != Some(nonce.as_str()) {
            return Err(rejected("nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| rejected("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(rejected("proof has the wrong length"));
        }
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ signature[i];
        }
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        let diff = computed
            .iter()
            .zip(self.verifier.stored_key.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Ok(None);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(Some(
            format!("v={}", B64.encode(server_signature)).into_bytes(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn run(server_password: &str, client_password: &str) -> Option<bool> {
        let verifier = ScramVerifier::new(server_password);
        let mut exchange = verifier.exchange();
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let server_first = exchange.server_first(client.message()).unwrap();
        client.update(&server_first).unwrap();
        let server_final = exchange.server_final(client.message()).unwrap()?;
        Some(client.finish(&server_final).is_ok())
    }

    #[test]
    fn right_password_is_accepted_and_server_proves_itself() {
        assert_eq!(run("s3cr@t/ pw", "s3cr@t/ pw"), Some(true));
        assert_eq!(run("pässwörd", "pässwörd"), Some(true));
    }

    #[test]
    fn wrong_password_is_rejected() {
        assert_eq!(run("right", "wrong"), None);
    }

    #[test]
    fn malformed_messages_are_errors() {
        let verifier = ScramVerifier::new("pw");
        for bad in [
            &b"garbage"[..],
            b"p=tls-server-end-point,,n=,r=abc",
            b"n,,n=,r=",
            b"\xff\xfe",
        ] {
            assert!(verifier.exchange().server_first(bad).is_err());
        }
        let mut ex = verifier.exchange();
        assert!(
            ex.server_final(b"c=biws,r=x,p=AAAA").is_err(),
            "out of order"
        );
        let mut ex = verifier.exchange();
        ex.server_first(b"n,,n=,r=abc").unwrap();
        assert!(ex.server_final(b"c=biws,r=wrongnonce,p=AAAA").is_err());
    }
}
