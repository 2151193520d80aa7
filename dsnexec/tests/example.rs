//! The example config in examples/dsnexec parses, compiles and renders.

use dsnexec::config::{self, DestinationSpec};
use dsnexec::runner::Runner;

const EXAMPLE: &str = include_str!("../../examples/dsnexec/config.yaml");
const SOURCE: &str = "/var/run/db-dsn/uri_dsn.txt";

#[test]
fn the_example_config_is_valid_and_renders_with_redaction() {
    let set = config::parse(EXAMPLE).expect("the example parses");
    config::validate_enabled(&set).expect("the example is complete");
    let c = set.enabled().next().expect("one enabled config").clone();
    assert_eq!(c.name, "fdw-user-mapping");
    assert!(c.transaction);
    assert!(matches!(c.destination, DestinationSpec::Postgres { .. }));

    // Point the source at a real file, keeping the template's key the same string.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("uri_dsn.txt");
    std::fs::write(
        &file,
        "postgres://remote_user:it%27s%20%5Csecret@db.example:5433/remotedb?sslmode=require",
    )
    .unwrap();
    let mut c = c;
    c.sources[0].path = file;
    assert_eq!(c.sources[0].key, SOURCE);
    let runner = Runner::new(c).expect("the templates compile");
    let rendered = runner.render_redacted().expect("renders");
    let (sql, args) = &rendered[0];
    assert!(args.is_none());
    assert!(
        sql.contains(&format!("SET password '<redacted:{SOURCE}#password>'")),
        "{sql}"
    );
    assert!(sql.contains("ALTER SERVER remote"), "{sql}");
    assert!(!sql.contains("secret"), "{sql}");
}
