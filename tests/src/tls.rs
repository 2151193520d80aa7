//! Throwaway certificates for TLS tests: a CA, server certificates good and bad, client certificates, written as PEM files PostgreSQL can read.
//!
//! PostgreSQL refuses a server key file that others can read, and as root the harness runs the
//! server as `nobody`: server keys are written with mode 0600 and owned by that account; the
//! directory is world-traversable so the server can reach the files.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{PermissionsExt, lchown};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, date_time_ymd,
};

use crate::PgOptions;

/// Host name in the wrong-host certificate: resolvable by nobody, matched by no test host.
pub const WRONG_HOST: &str = "db.wrong-host.invalid";

/// Which certificate a PostgreSQL server under test presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerCert {
    /// Signed by [`TestPki::ca`], valid now, for `localhost`, `127.0.0.1` and `::1`.
    Valid,
    /// Signed by [`TestPki::ca`] for the right names, but expired in 2021.
    Expired,
    /// Signed by [`TestPki::ca`], valid now, only for [`WRONG_HOST`].
    WrongHost,
    /// Valid names and dates, signed by [`TestPki::other_ca`] (unknown to clients trusting `ca`).
    OtherCa,
}

/// A certificate file and its key file.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A private PKI in a temporary directory, removed on drop.
pub struct TestPki {
    dir: tempfile::TempDir,
    ca: Issuer<'static, KeyPair>,
    other_ca: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM) that signs every certificate except [`ServerCert::OtherCa`].
    pub ca_cert: PathBuf,
    /// A second, unrelated CA certificate (PEM).
    pub other_ca_cert: PathBuf,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl TestPki {
    /// Creates the two CAs.
    pub fn generate() -> anyhow::Result<TestPki> {
        let base = if is_root() {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("dbtests-pki-")
            .tempdir_in(base)
            .context("creating the PKI directory")?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let (ca, ca_pem) = new_ca("dbtests CA")?;
        let (other_ca, other_pem) = new_ca("dbtests unrelated CA")?;
        let ca_cert = dir.path().join("ca.crt");
        let other_ca_cert = dir.path().join("other-ca.crt");
        write_public(&ca_cert, ca_pem.as_bytes())?;
        write_public(&other_ca_cert, other_pem.as_bytes())?;
        Ok(TestPki {
            dir,
            ca,
            other_ca,
            ca_cert,
            other_ca_cert,
        })
    }

    /// The directory holding every file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// PEM text of a new server certificate and its key, signed by the test CA, valid now for
    /// `names` (DNS names or IP literals).
    pub fn server_pem(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let params = leaf_params(names, "dbtests server", ExtendedKeyUsagePurpose::ServerAuth)?;
        sign(params, &self.ca)
    }

    /// Writes the certificate a server presents, with its key readable only by the account the
    /// harness runs PostgreSQL as.
    pub fn server_files(&self, which: ServerCert) -> anyhow::Result<CertFiles> {
        let good_names = ["localhost", "127.0.0.1", "::1"];
        let (names, issuer, label): (&[&str], _, _) = match which {
            ServerCert::Valid => (&good_names, &self.ca, "server"),
            ServerCert::Expired => (&good_names, &self.ca, "expired"),
            ServerCert::WrongHost => (&[WRONG_HOST], &self.ca, "wrong-host"),
            ServerCert::OtherCa => (&good_names, &self.other_ca, "other-ca-server"),
        };
        let mut params = leaf_params(names, "dbtests server", ExtendedKeyUsagePurpose::ServerAuth)?;
        if which == ServerCert::Expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let (cert_pem, key_pem) = sign(params, issuer)?;
        let files = CertFiles {
            cert: self.dir.path().join(format!("{label}.crt")),
            key: self.dir.path().join(format!("{label}.key")),
        };
        write_public(&files.cert, cert_pem.as_bytes())?;
        write_server_key(&files.key, key_pem.as_bytes())?;
        Ok(files)
    }

    /// Writes a client certificate whose common name is `role` (for `hostssl ... cert`).
    pub fn client_files(&self, role: &str) -> anyhow::Result<CertFiles> {
        let mut params = leaf_params(&[], role, ExtendedKeyUsagePurpose::ClientAuth)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, role);
        let (cert_pem, key_pem) = sign(params, &self.ca)?;
        let safe: String = role
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let files = CertFiles {
            cert: self.dir.path().join(format!("client-{safe}.crt")),
            key: self.dir.path().join(format!("client-{safe}.key")),
        };
        write_public(&files.cert, cert_pem.as_bytes())?;
        write_private(&files.key, key_pem.as_bytes())?;
        Ok(files)
    }

    /// Cluster options with `ssl=on` presenting `which`, trusting the test CA for client
    /// certificates, and the given pg_hba.conf lines (for example
    /// `hostssl all all 127.0.0.1/32 scram-sha-256`).
    pub fn pg_options(&self, which: ServerCert, hba: &[&str]) -> anyhow::Result<PgOptions> {
        let files = self.server_files(which)?;
        Ok(PgOptions {
            extra_conf: vec![
                "ssl = on".into(),
                format!("ssl_cert_file = '{}'", conf_path(&files.cert)?),
                format!("ssl_key_file = '{}'", conf_path(&files.key)?),
                format!("ssl_ca_file = '{}'", conf_path(&self.ca_cert)?),
            ],
            hba: hba.iter().map(|l| l.to_string()).collect(),
            ..PgOptions::default()
        })
    }
}

/// A self-signed CA certificate and its issuer.
fn new_ca(name: &str) -> anyhow::Result<(Issuer<'static, KeyPair>, String)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((Issuer::new(params, key), cert.pem()))
}

/// Parameters of an end-entity certificate for `names` valid from yesterday for a year.
fn leaf_params(
    names: &[&str],
    common_name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> anyhow::Result<CertificateParams> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(86_400);
    params.not_before = (now - day).into();
    params.not_after = (now + 365 * day).into();
    Ok(params)
}

/// Signs `params` with a fresh key; returns (certificate PEM, PKCS#8 key PEM).
fn sign(
    params: CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_public(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))?;
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// A key PostgreSQL accepts: mode 0600, owned by the account the server runs as.
fn write_server_key(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_private(path, bytes)?;
    if let Some((uid, gid)) = server_account()? {
        lchown(path, Some(uid), Some(gid)).with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// A path quoted for postgresql.conf.
fn conf_path(path: &Path) -> anyhow::Result<String> {
    Ok(path
        .to_str()
        .ok_or_else(|| anyhow!("path {} is not UTF-8", path.display()))?
        .replace('\'', "''"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The account `PgCluster` runs the server as when we are root (`nobody`), as (uid, gid).
/// Mirrors the harness's private choice in `postgres.rs`.
fn server_account() -> anyhow::Result<Option<(u32, u32)>> {
    if !is_root() {
        return Ok(None);
    }
    let name = CString::new("nobody").map_err(|e| anyhow!("{e}"))?;
    // SAFETY: getpwnam returns null or a pointer to static storage, read at once.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Ok(Some((65534, 65534)));
    }
    // SAFETY: checked non-null above.
    Ok(Some(unsafe { ((*entry).pw_uid, (*entry).pw_gid) }))
}
