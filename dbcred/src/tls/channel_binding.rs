//! RFC 5929 `tls-server-end-point` channel binding: the hash of the server's leaf certificate, as SCRAM-SHA-256-PLUS needs it.
//!
//! The hash function is the one the certificate's own signature uses, with MD5 and SHA-1
//! upgraded to SHA-256 (RFC 5929 section 4.1), which is what PostgreSQL computes with
//! `X509_get_signature_nid` + `OBJ_find_sigid_algs`. We only need the signature algorithm OID,
//! so instead of a full X.509 parser (x509-parser pulls in nom, asn1-rs, der-parser, ...) a
//! minimal DER walk reads `Certificate.signatureAlgorithm.algorithm`: three nested TLVs.
//!
//! Certificates signed with RSASSA-PSS or EdDSA give `None`: OpenSSL's `OBJ_find_sigid_algs`
//! has no digest for them, so PostgreSQL cannot do channel binding with such a certificate
//! either; the caller then logs in without `-PLUS` (or fails under `channel_binding=require`).

use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

/// Hash functions that can appear in a certificate signature algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndPointHash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// The `tls-server-end-point` binding data for a DER certificate, or `None` when the
/// certificate cannot be parsed or uses a signature algorithm without a usable hash.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    let hash = end_point_hash(signature_algorithm_oid(cert_der)?)?;
    Some(match hash {
        EndPointHash::Sha224 => Sha224::digest(cert_der).to_vec(),
        EndPointHash::Sha256 => Sha256::digest(cert_der).to_vec(),
        EndPointHash::Sha384 => Sha384::digest(cert_der).to_vec(),
        EndPointHash::Sha512 => Sha512::digest(cert_der).to_vec(),
    })
}

/// DER content of the OID in `Certificate.signatureAlgorithm`.
fn signature_algorithm_oid(der: &[u8]) -> Option<&[u8]> {
    let (certificate, _) = expect_tlv(der, 0x30)?;
    let (_tbs, rest) = expect_tlv(certificate, 0x30)?;
    let (algorithm, _) = expect_tlv(rest, 0x30)?;
    let (oid, _) = expect_tlv(algorithm, 0x06)?;
    Some(oid)
}

/// Reads one TLV with the given single-byte tag; returns (content, rest).
fn expect_tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, input) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len0, mut input) = input.split_first()?;
    let len = if len0 < 0x80 {
        usize::from(len0)
    } else {
        let count = usize::from(len0 & 0x7f);
        if count == 0 || count > 4 || input.len() < count {
            return None;
        }
        let (bytes, rest) = input.split_at(count);
        input = rest;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if input.len() < len {
        return None;
    }
    Some(input.split_at(len))
}

/// The RFC 5929 hash for a signature algorithm OID (DER content bytes).
pub(crate) fn end_point_hash(oid: &[u8]) -> Option<EndPointHash> {
    const PKCS1: [u8; 8] = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: [u8; 6] = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    const NIST_DSA: [u8; 8] = [0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03];
    use EndPointHash::*;
    if let Some(rest) = oid.strip_prefix(&PKCS1) {
        return match rest {
            // md5WithRSAEncryption, sha1WithRSAEncryption: upgraded to SHA-256.
            [4] | [5] => Some(Sha256),
            [11] => Some(Sha256),
            [12] => Some(Sha384),
            [13] => Some(Sha512),
            [14] => Some(Sha224),
            // 10 is RSASSA-PSS: see the module docs.
            _ => None,
        };
    }
    if let Some(rest) = oid.strip_prefix(&ECDSA) {
        return match rest {
            [1] => Some(Sha256), // ecdsa-with-SHA1
            [3, 1] => Some(Sha224),
            [3, 2] => Some(Sha256),
            [3, 3] => Some(Sha384),
            [3, 4] => Some(Sha512),
            _ => None,
        };
    }
    if let Some(rest) = oid.strip_prefix(&NIST_DSA) {
        return match rest {
            // dsa-with-sha224/256, ecdsa-with-SHA3-*: only the SHA-2 ones are mapped.
            [1] => Some(Sha224),
            [2] => Some(Sha256),
            _ => None,
        };
    }
    match oid {
        // dsa-with-sha1 (1.2.840.10040.4.3), sha1WithRSA (OIW 1.3.14.3.2.29).
        [0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x03] | [0x2b, 0x0e, 0x03, 0x02, 0x1d] => Some(Sha256),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).expect("key generation");
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .self_signed(&key)
            .expect("self-signed")
            .der()
            .to_vec()
    }

    #[test]
    fn ecdsa_p256_sha256_uses_sha256() {
        let der = cert_with(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            tls_server_end_point(&der),
            Some(Sha256::digest(&der).to_vec())
        );
    }

    #[test]
    fn ecdsa_p384_sha384_uses_sha384() {
        let der = cert_with(&rcgen::PKCS_ECDSA_P384_SHA384);
        let got = tls_server_end_point(&der).expect("hash");
        assert_eq!(got.len(), 48);
        assert_eq!(got, Sha384::digest(&der).to_vec());
    }

    #[test]
    fn ed25519_has_no_end_point_hash() {
        let der = cert_with(&rcgen::PKCS_ED25519);
        assert_eq!(tls_server_end_point(&der), None);
    }

    #[test]
    fn rsa_oids_map_as_rfc5929_says() {
        let pkcs1 = |n: u8| [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, n];
        assert_eq!(end_point_hash(&pkcs1(4)), Some(EndPointHash::Sha256));
        assert_eq!(end_point_hash(&pkcs1(5)), Some(EndPointHash::Sha256));
        assert_eq!(end_point_hash(&pkcs1(11)), Some(EndPointHash::Sha256));
        assert_eq!(end_point_hash(&pkcs1(12)), Some(EndPointHash::Sha384));
        assert_eq!(end_point_hash(&pkcs1(13)), Some(EndPointHash::Sha512));
        assert_eq!(end_point_hash(&pkcs1(14)), Some(EndPointHash::Sha224));
        assert_eq!(end_point_hash(&pkcs1(10)), None);
    }

    #[test]
    fn truncated_or_garbage_der_gives_none() {
        let der = cert_with(&rcgen::PKCS_ECDSA_P256_SHA256);
        for cut in [0, 1, 2, 5, 40, der.len() / 2] {
            assert_eq!(tls_server_end_point(&der[..cut]), None, "cut at {cut}");
        }
        assert_eq!(tls_server_end_point(b"\x30\x84\xff\xff\xff\xff"), None);
    }
}
