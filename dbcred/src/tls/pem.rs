//! Reads PEM certificates, private keys and CRLs from files, with errors that never quote the content.

use std::path::Path;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use super::TlsError;

/// Largest file we read: certificate bundles are a few hundred kB at most.
const MAX_FILE_BYTES: u64 = 16 << 20;

fn file_error(what: &'static str, path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::File {
        what,
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// Reads a whole file, refusing absurd sizes. The error names the I/O problem, never the bytes.
pub(crate) fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let meta = std::fs::metadata(path).map_err(|e| file_error(what, path, io_problem(&e)))?;
    if meta.is_dir() {
        return Err(file_error(
            what,
            path,
            "is a directory, expected a PEM file",
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(file_error(what, path, "is larger than 16 MiB"));
    }
    std::fs::read(path).map_err(|e| file_error(what, path, io_problem(&e)))
}

fn io_problem(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "file does not exist".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => format!("cannot read it ({e})"),
    }
}

/// Describes a PEM parse failure by category only (the crate's messages may echo lines).
fn pem_problem(e: &pem::Error) -> &'static str {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line",
        pem::Error::IllegalSectionStart { .. } => "malformed PEM BEGIN line",
        pem::Error::Base64Decode(_) => "invalid base64 inside a PEM section",
        pem::Error::SectionTooLarge => "a PEM section is too large",
        _ => "not valid PEM",
    }
}

/// Every `CERTIFICATE` section of a PEM file (at least one).
pub(crate) fn certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(what, path)?;
    certificates_from_slice(&bytes).map_err(|p| file_error(what, path, p))
}

/// Every `CERTIFICATE` section of PEM text (at least one).
pub(crate) fn certificates_from_slice(
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, &'static str> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_problem(&e))?;
    if certs.is_empty() {
        return Err("no PEM CERTIFICATE section found");
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub(crate) fn private_key(
    what: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_file(what, path)?;
    private_key_from_slice(&bytes).map_err(|p| file_error(what, path, p))
}

/// The first private key of PEM text.
pub(crate) fn private_key_from_slice(bytes: &[u8]) -> Result<PrivateKeyDer<'static>, &'static str> {
    match PrivateKeyDer::from_pem_slice(bytes) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) if contains(bytes, b"ENCRYPTED PRIVATE KEY") => Err(
            "the private key is encrypted (sslpassword is not supported): store it unencrypted \
             with mode 0600",
        ),
        Err(pem::Error::NoItemsFound) => Err("no PEM private key section found"),
        Err(e) => Err(pem_problem(&e)),
    }
}

/// Every CRL of a PEM file (at least one).
pub(crate) fn crls(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = read_file(what, path)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(what, path, pem_problem(&e)))?;
    if crls.is_empty() {
        return Err(file_error(what, path, "no PEM X509 CRL section found"));
    }
    Ok(crls)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
