//! Names shared with pods, db-controller and the other sidecars (ARCHITECTURE.md's injection contract).

/// Label naming the DatabaseClaim or DbRoleClaim in the pod's namespace.
pub const LABEL_CLAIM: &str = "persistance.atlas.infoblox.com/claim";
/// Label selecting which webhook (class) acts on the pod; missing means `default`, as in db-controller.
pub const LABEL_CLASS: &str = "persistance.atlas.infoblox.com/class";
/// Label whose value `enabled` asks for the proxy.
pub const LABEL_DBPROXY: &str = "persistance.atlas.infoblox.com/dbproxy";
/// Label whose value `enabled` asks for dsnexec.
pub const LABEL_DSNEXEC: &str = "persistance.atlas.infoblox.com/dsnexec";
/// Label naming the Secret that holds dsnexec's `config.yaml`.
pub const LABEL_DSNEXEC_CONFIG: &str = "persistance.atlas.infoblox.com/dsnexec-config";
/// Annotation overriding [`LABEL_DSNEXEC_CONFIG`] (db-controller's name).
pub const ANNOTATION_DSNEXEC_CONFIG: &str = "infoblox.com/dsnexec-config-secret";
/// Annotation naming the DSN Secret directly, for clusters without db-controller (ours).
pub const ANNOTATION_SECRET_NAME: &str = "persistance.atlas.infoblox.com/secret-name";
/// Annotation set to `"true"` once the proxy is injected.
pub const ANNOTATION_INJECTED_DBPROXY: &str = "persistance.atlas.infoblox.com/injected-dbproxy";
/// Annotation set to `"true"` once dsnexec is injected.
pub const ANNOTATION_INJECTED_DSNEXEC: &str = "persistance.atlas.infoblox.com/injected-dsnexec";
/// Prefix of the per-pod resource override annotations:
/// `<prefix><container>-<cpu|memory>-<request|limit>`, e.g.
/// `persistance.atlas.infoblox.com/dbproxy-cpu-request`.
pub const ANNOTATION_RESOURCE_PREFIX: &str = "persistance.atlas.infoblox.com/";

/// The value of [`LABEL_DBPROXY`] / [`LABEL_DSNEXEC`] that turns injection on.
pub const ENABLED: &str = "enabled";
/// Class assumed for pods without [`LABEL_CLASS`].
pub const DEFAULT_CLASS: &str = "default";

/// Container name of the injected proxy.
pub const DBPROXY_CONTAINER: &str = "dbproxy";
/// Container name of the injected dsnexec.
pub const DSNEXEC_CONTAINER: &str = "dsnexec";
/// Volume holding the DSN Secret for the proxy.
pub const DBPROXY_VOLUME: &str = "dbproxydsn";
/// Where the proxy's DSN Secret is mounted.
pub const DBPROXY_MOUNT: &str = "/dbproxy";
/// Environment variable the proxy reads its DSN file from (db-controller's name).
pub const DBPROXY_CREDENTIAL_ENV: &str = "DBPROXY_CREDENTIAL";
/// The DSN file the proxy reads.
pub const DBPROXY_CREDENTIAL_PATH: &str = "/dbproxy/uri_dsn.txt";
/// The proxy's HTTP ops port (health, metrics).
pub const DBPROXY_OPS_PORT: u16 = 9432;
/// Volume holding the DSN Secret for dsnexec.
pub const DSNEXEC_DSN_VOLUME: &str = "db-dsn";
/// Where dsnexec's DSN Secret is mounted.
pub const DSNEXEC_DSN_MOUNT: &str = "/var/run/db-dsn";
/// Volume holding dsnexec's config Secret.
pub const DSNEXEC_CONFIG_VOLUME: &str = "dsnexec-config";
/// Where dsnexec's config Secret is mounted.
pub const DSNEXEC_CONFIG_MOUNT: &str = "/var/run/dsn-exec";
/// The config file dsnexec is started with.
pub const DSNEXEC_CONFIG_FILE: &str = "/var/run/dsn-exec/config.yaml";
/// dsnexec's HTTP ops port.
pub const DSNEXEC_OPS_PORT: u16 = 9433;

/// API group of db-controller's claims.
pub const CLAIM_GROUP: &str = "persistance.atlas.infoblox.com";
/// API version of db-controller's claims.
pub const CLAIM_VERSION: &str = "v1";
