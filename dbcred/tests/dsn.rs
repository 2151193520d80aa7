//! DSN parsing against libpq's documented behaviour: both forms, Secret directories, errors
//! that never leak a secret, and real logins through libpq (`psql`) with parsed credentials.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use dbcred::{Dsn, DsnError, HostKind, SslMode, TargetHost};
use dbtests::{PasswordKind, PgCluster, SecretDir};

/// Passwords that break naive parsers: every URI delimiter, quotes, backslashes, spaces,
/// non-ASCII, and a 2 kB token.
fn tricky_passwords() -> Vec<String> {
    let mut v: Vec<String> = [
        "p@ss",
        "a:b",
        "sl/ash",
        "que?ry",
        "ha#sh",
        "per%cent",
        "per%41cent",
        "it's",
        "back\\slash",
        "\\'",
        "with space",
        " lead and trail ",
        "tab\there",
        "amp&eq=",
        "[bracket]",
        "com,ma",
        "plus+",
        "pässwörd-密码-🔑",
        "@:/?#%'\\ all",
        "'",
        "\\",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // A 2 kB IAM-token-like password with every printable ASCII character.
    let printable: String = (0x20u8..0x7f).map(char::from).collect();
    v.push(printable.repeat(22).chars().take(2048).collect());
    v
}

/// Percent-encodes everything but RFC 3986 unreserved characters, as a careful writer would.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Single-quotes a key=value value the way the libpq docs describe.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn params(d: &Dsn) -> BTreeMap<String, String> {
    d.params()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn tcp(host: &str, port: u16) -> TargetHost {
    TargetHost {
        host: HostKind::Tcp(host.into()),
        hostaddr: None,
        port,
    }
}

fn unix(dir: &str, port: u16) -> TargetHost {
    TargetHost {
        host: HostKind::Unix(PathBuf::from(dir)),
        hostaddr: None,
        port,
    }
}

/// Inputs that parse, with every parameter they must yield. The first rows are the examples
/// of the PostgreSQL docs ("Connection Strings"); the results were checked against libpq's own
/// `PQconninfoParse`.
#[test]
fn parses_like_libpq() {
    let cases: &[(&str, &[(&str, &str)])] = &[
        // Docs, key=value form.
        (
            "host=localhost port=5432 dbname=mydb connect_timeout=10",
            &[
                ("host", "localhost"),
                ("port", "5432"),
                ("dbname", "mydb"),
                ("connect_timeout", "10"),
            ],
        ),
        // Docs, URI form.
        ("postgresql://", &[]),
        ("postgresql://localhost", &[("host", "localhost")]),
        (
            "postgresql://localhost:5433",
            &[("host", "localhost"), ("port", "5433")],
        ),
        (
            "postgresql://localhost/mydb",
            &[("host", "localhost"), ("dbname", "mydb")],
        ),
        (
            "postgresql://user@localhost",
            &[("user", "user"), ("host", "localhost")],
        ),
        (
            "postgresql://user:secret@localhost",
            &[
                ("user", "user"),
                ("password", "secret"),
                ("host", "localhost"),
            ],
        ),
        (
            "postgresql://other@localhost/otherdb?connect_timeout=10&application_name=myapp",
            &[
                ("user", "other"),
                ("host", "localhost"),
                ("dbname", "otherdb"),
                ("connect_timeout", "10"),
                ("application_name", "myapp"),
            ],
        ),
        (
            "postgresql://host1:123,host2:456/somedb?target_session_attrs=any&application_name=myapp",
            &[
                ("host", "host1,host2"),
                ("port", "123,456"),
                ("dbname", "somedb"),
                ("target_session_attrs", "any"),
                ("application_name", "myapp"),
            ],
        ),
        (
            "postgresql:///mydb?host=localhost&port=5433",
            &[("dbname", "mydb"), ("host", "localhost"), ("port", "5433")],
        ),
        (
            "postgresql://[2001:db8::1234]/database",
            &[("host", "2001:db8::1234"), ("dbname", "database")],
        ),
        (
            "postgresql:///dbname?host=/var/lib/postgresql",
            &[("dbname", "dbname"), ("host", "/var/lib/postgresql")],
        ),
        (
            "postgresql://%2Fvar%2Flib%2Fpostgresql/dbname",
            &[("host", "/var/lib/postgresql"), ("dbname", "dbname")],
        ),
        (
            "postgresql://localhost/mydb?user=other&password=secret",
            &[
                ("host", "localhost"),
                ("dbname", "mydb"),
                ("user", "other"),
                ("password", "secret"),
            ],
        ),
        // key=value whitespace, quoting and escapes.
        (
            "  host = localhost\tport=\n5432  ",
            &[("host", "localhost"), ("port", "5432")],
        ),
        (
            "password='a b' user=x",
            &[("password", "a b"), ("user", "x")],
        ),
        ("password=a\\ b", &[("password", "a b")]),
        (
            "password='it\\'s' user=\\\\x",
            &[("password", "it's"), ("user", "\\x")],
        ),
        ("password='' user=x", &[("password", ""), ("user", "x")]),
        ("host=", &[("host", "")]),
        // libpq: after `=` whitespace is skipped and the next word is the value.
        ("host= port=5432", &[("host", "port=5432")]),
        ("host=a=b", &[("host", "a=b")]),
        ("host=a\\", &[("host", "a")]),
        (
            "options='-c search_path=x'",
            &[("options", "-c search_path=x")],
        ),
        // Duplicates: last one wins.
        ("host=a host=b", &[("host", "b")]),
        (
            "postgres://u@h/d?user=v",
            &[("user", "v"), ("host", "h"), ("dbname", "d")],
        ),
        // URI details.
        ("postgres://h", &[("host", "h")]),
        ("POSTGRES://h", &[("host", "h")]),
        (
            "postgres://u:p%40ss@h/d",
            &[
                ("user", "u"),
                ("password", "p@ss"),
                ("host", "h"),
                ("dbname", "d"),
            ],
        ),
        // The first '@' ends the credentials, as in libpq.
        (
            "postgres://u:a:b@h",
            &[("user", "u"), ("password", "a:b"), ("host", "h")],
        ),
        ("postgres://:pw@h", &[("password", "pw"), ("host", "h")]),
        ("postgres://u:@h", &[("user", "u"), ("host", "h")]),
        ("postgres://h/", &[("host", "h")]),
        ("postgres://h/d?", &[("host", "h"), ("dbname", "d")]),
        (
            "postgres://h/d?sslmode=require&",
            &[("host", "h"), ("dbname", "d"), ("sslmode", "require")],
        ),
        ("postgres://h?dbname=x", &[("host", "h"), ("dbname", "x")]),
        // '#' is not special in libpq URIs, '+' is not a space.
        ("postgres://h/d#x", &[("host", "h"), ("dbname", "d#x")]),
        (
            "postgres://h/d?application_name=a+b",
            &[("host", "h"), ("dbname", "d"), ("application_name", "a+b")],
        ),
        (
            "postgres://h/d?options=-c%20x%3Dy",
            &[("host", "h"), ("dbname", "d"), ("options", "-c x=y")],
        ),
        (
            "postgres://h/d?ssl=true",
            &[("host", "h"), ("dbname", "d"), ("sslmode", "require")],
        ),
        (
            "postgres://h/d?%73slmode=disable",
            &[("host", "h"), ("dbname", "d"), ("sslmode", "disable")],
        ),
        (
            "postgres://[::1]:5433/d",
            &[("host", "::1"), ("port", "5433"), ("dbname", "d")],
        ),
        (
            "postgres://[fe80::1%25eth0]:5432/d",
            &[("host", "fe80::1%eth0"), ("port", "5432"), ("dbname", "d")],
        ),
        (
            "postgres://[::1],h2:7/d",
            &[("host", "::1,h2"), ("port", ",7"), ("dbname", "d")],
        ),
        (
            "postgres://h1,h2/d",
            &[("host", "h1,h2"), ("port", ","), ("dbname", "d")],
        ),
        ("postgres://:5433/d", &[("port", "5433"), ("dbname", "d")]),
        (
            "postgres://h/d?host=%2Ftmp&port=6",
            &[("host", "/tmp"), ("port", "6"), ("dbname", "d")],
        ),
        (
            "postgres://h/d?hostaddr=127.0.0.1",
            &[("host", "h"), ("hostaddr", "127.0.0.1"), ("dbname", "d")],
        ),
        ("requiressl=1", &[("sslmode", "require")]),
        ("requiressl=0", &[("sslmode", "prefer")]),
        (
            "postgres://h/?requiressl=1",
            &[("host", "h"), ("sslmode", "require")],
        ),
        // Non-ASCII everywhere.
        (
            "postgres://j%C3%BCrgen@h/d%C3%A9j%C3%A0",
            &[("user", "jürgen"), ("host", "h"), ("dbname", "déjà")],
        ),
        (
            "user=jürgen dbname='déjà vu'",
            &[("user", "jürgen"), ("dbname", "déjà vu")],
        ),
        // A trailing newline from a Secret file.
        (
            "postgres://u:p@h/d?sslmode=disable\n",
            &[
                ("user", "u"),
                ("password", "p"),
                ("host", "h"),
                ("dbname", "d"),
                ("sslmode", "disable"),
            ],
        ),
        ("host=h password=p\n", &[("host", "h"), ("password", "p")]),
    ];
    for (input, want) in cases {
        let got = Dsn::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert_eq!(params(&got), map(want), "{input:?}");
    }
}

/// Every keyword of libpq (PostgreSQL 18) is accepted in both forms.
#[test]
fn accepts_every_libpq_keyword() {
    let cases = [
        ("service", "svc"),
        ("user", "u"),
        ("password", "p"),
        ("passfile", "/x/.pgpass"),
        ("channel_binding", "require"),
        ("connect_timeout", "10"),
        ("dbname", "d"),
        ("host", "h"),
        ("hostaddr", "10.0.0.1"),
        ("port", "5432"),
        ("client_encoding", "UTF8"),
        ("options", "-c geqo=off"),
        ("application_name", "app"),
        ("fallback_application_name", "fb"),
        ("keepalives", "1"),
        ("keepalives_idle", "30"),
        ("keepalives_interval", "5"),
        ("keepalives_count", "3"),
        ("tcp_user_timeout", "1000"),
        ("sslmode", "verify-full"),
        ("sslnegotiation", "direct"),
        ("sslcompression", "0"),
        ("sslcert", "/c.crt"),
        ("sslkey", "/c.key"),
        ("sslcertmode", "allow"),
        ("sslpassword", "kp"),
        ("sslrootcert", "/root.crt"),
        ("sslcrl", "/crl.pem"),
        ("sslcrldir", "/crls"),
        ("sslsni", "1"),
        ("sslkeylogfile", "/tmp/keys"),
        ("requirepeer", "postgres"),
        ("require_auth", "scram-sha-256"),
        ("min_protocol_version", "3.0"),
        ("max_protocol_version", "latest"),
        ("ssl_min_protocol_version", "TLSv1.2"),
        ("ssl_max_protocol_version", "TLSv1.3"),
        ("gssencmode", "disable"),
        ("krbsrvname", "postgres"),
        ("gsslib", "gssapi"),
        ("gssdelegation", "0"),
        ("replication", "database"),
        ("target_session_attrs", "read-write"),
        ("load_balance_hosts", "random"),
        ("scram_client_key", "Y2s="),
        ("scram_server_key", "c2s="),
        ("oauth_issuer", "https://issuer.example"),
        ("oauth_client_id", "cid"),
        ("oauth_client_secret", "cs"),
        ("oauth_scope", "openid"),
    ];
    for (k, v) in cases {
        let kv = Dsn::parse(&format!("{k}={}", quote(v))).unwrap_or_else(|e| panic!("{k}: {e}"));
        assert_eq!(kv.get(k), Some(v), "{k} (key=value)");
        let uri = Dsn::parse(&format!("postgres://h?{k}={}", enc(v)))
            .unwrap_or_else(|e| panic!("{k}: {e}"));
        assert_eq!(uri.get(k), Some(v), "{k} (URI)");
        let set = Dsn::default()
            .with_param(k, v)
            .unwrap_or_else(|e| panic!("{k}: {e}"));
        assert_eq!(set.get(k), Some(v), "{k} (with_param)");
    }
}

#[test]
fn tricky_passwords_in_both_forms() {
    for pw in tricky_passwords() {
        let uri = format!(
            "postgresql://{}:{}@db.example:6432/app?sslmode=require",
            enc("us@r"),
            enc(&pw)
        );
        let d = Dsn::parse(&uri)
            .unwrap_or_else(|e| panic!("URI with password of {} bytes: {e}", pw.len()));
        assert_eq!(d.password(), Some(pw.as_str()), "URI");
        assert_eq!(d.user(), Some("us@r"));
        assert_eq!(d.hosts(), vec![tcp("db.example", 6432)]);
        assert_eq!(d.sslmode(), SslMode::Require);

        let kv = format!(
            "host=db.example port=6432 user='us@r' password={} dbname=app sslmode=require",
            quote(&pw)
        );
        let k = Dsn::parse(&kv)
            .unwrap_or_else(|e| panic!("key=value with password of {} bytes: {e}", pw.len()));
        assert_eq!(k, d, "both forms mean the same");

        // libpq also lets a backslash escape any character of an unquoted value.
        let escaped: String = pw.chars().flat_map(|c| ['\\', c]).collect();
        let e =
            Dsn::parse(&format!("password={escaped}")).unwrap_or_else(|e| panic!("escaped: {e}"));
        assert_eq!(e.password(), Some(pw.as_str()), "escaped unquoted");
    }
}

#[test]
fn hosts_follow_libpq_pairing() {
    let cases: Vec<(&str, Vec<TargetHost>)> = vec![
        ("", vec![tcp("localhost", 5432)]),
        ("postgres://", vec![tcp("localhost", 5432)]),
        ("host=h", vec![tcp("h", 5432)]),
        ("port=6000", vec![tcp("localhost", 6000)]),
        ("host=a,b port=7", vec![tcp("a", 7), tcp("b", 7)]),
        ("host=a,b port=7,8", vec![tcp("a", 7), tcp("b", 8)]),
        ("host=a,b port=,8", vec![tcp("a", 5432), tcp("b", 8)]),
        (
            "host=a,,c",
            vec![tcp("a", 5432), tcp("localhost", 5432), tcp("c", 5432)],
        ),
        (
            "postgres://h1:5432,h2:5433/db",
            vec![tcp("h1", 5432), tcp("h2", 5433)],
        ),
        (
            "postgres://h1,h2:5433/db",
            vec![tcp("h1", 5432), tcp("h2", 5433)],
        ),
        (
            "postgres://h1,h2/db?port=6",
            vec![tcp("h1", 6), tcp("h2", 6)],
        ),
        (
            "postgres://[::1]:6,[2001:db8::2]/d",
            vec![tcp("::1", 6), tcp("2001:db8::2", 5432)],
        ),
        (
            "postgres:///d?host=/var/run/postgresql",
            vec![unix("/var/run/postgresql", 5432)],
        ),
        (
            "postgres://%2Fvar%2Frun:5433/d",
            vec![unix("/var/run", 5433)],
        ),
        ("host=@abstract", vec![unix("@abstract", 5432)]),
        ("host=/tmp,db port=1,2", vec![unix("/tmp", 1), tcp("db", 2)]),
        (
            "host=h hostaddr=10.0.0.1",
            vec![TargetHost {
                host: HostKind::Tcp("h".into()),
                hostaddr: Some("10.0.0.1".into()),
                port: 5432,
            }],
        ),
        (
            "hostaddr=10.0.0.1,::1 port=7",
            vec![
                TargetHost {
                    host: HostKind::Tcp("10.0.0.1".into()),
                    hostaddr: Some("10.0.0.1".into()),
                    port: 7,
                },
                TargetHost {
                    host: HostKind::Tcp("::1".into()),
                    hostaddr: Some("::1".into()),
                    port: 7,
                },
            ],
        ),
        (
            "host=a,b hostaddr=,10.0.0.2",
            vec![
                tcp("a", 5432),
                TargetHost {
                    host: HostKind::Tcp("b".into()),
                    hostaddr: Some("10.0.0.2".into()),
                    port: 5432,
                },
            ],
        ),
    ];
    for (input, want) in cases {
        let d = if input.is_empty() {
            Dsn::default()
        } else {
            Dsn::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"))
        };
        assert_eq!(d.hosts(), want, "{input:?}");
    }
}

#[test]
fn connect_timeout_and_sslmode_like_libpq() {
    for (input, want) in [
        ("host=h", None),
        ("connect_timeout=0", None),
        ("connect_timeout=-5", None),
        ("connect_timeout=1", Some(2)),
        ("connect_timeout=2", Some(2)),
        ("connect_timeout=' 30 '", Some(30)),
        ("postgres://h?connect_timeout=10", Some(10)),
    ] {
        let d = Dsn::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(
            d.connect_timeout(),
            want.map(Duration::from_secs),
            "{input}"
        );
    }
    for (input, want) in [
        ("host=h", SslMode::Prefer),
        ("sslmode=disable", SslMode::Disable),
        ("sslmode=allow", SslMode::Allow),
        ("sslmode=prefer", SslMode::Prefer),
        ("sslmode=require", SslMode::Require),
        ("sslmode=verify-ca", SslMode::VerifyCa),
        ("sslmode=verify-full", SslMode::VerifyFull),
        ("requiressl=1", SslMode::Require),
        ("sslrootcert=system", SslMode::VerifyFull),
        ("postgres://h?ssl=true", SslMode::Require),
    ] {
        let d = Dsn::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(d.sslmode(), want, "{input}");
        assert_eq!(d.sslmode().to_string(), want.as_str());
    }
}

/// Every way the text can be wrong, with the error it must give.
#[test]
fn errors_name_the_problem() {
    type Check = fn(&DsnError) -> bool;
    let cases: &[(&str, Check, &str)] = &[
        ("", |e| *e == DsnError::Empty, "empty"),
        (" \n\t", |e| *e == DsnError::Empty, "empty"),
        (
            "host=a\0b",
            |e| *e == DsnError::NulByte { offset: 6 },
            "NUL",
        ),
        (
            "mysql://u:p@h/d",
            |e| matches!(e, DsnError::UnsupportedScheme { scheme: Some(scheme) } if scheme == "mysql"),
            "mysql",
        ),
        (
            "host",
            |e| *e == DsnError::MissingEquals { offset: 0 },
            "missing \"=\"",
        ),
        (
            "host=a port",
            |e| *e == DsnError::MissingEquals { offset: 7 },
            "missing \"=\"",
        ),
        (
            "host=a  port  5432",
            |e| *e == DsnError::MissingEquals { offset: 8 },
            "missing \"=\"",
        ),
        (
            "host='abc",
            |e| *e == DsnError::UnterminatedQuote { offset: 5 },
            "unterminated quote",
        ),
        (
            "password='it\\'",
            |e| *e == DsnError::UnterminatedQuote { offset: 9 },
            "unterminated quote",
        ),
        (
            "hots=a",
            |e| {
                *e == DsnError::UnknownKeyword {
                    keyword: Some("hots".into()),
                    offset: Some(0),
                }
            },
            "hots",
        ),
        (
            "=a",
            |e| {
                *e == DsnError::UnknownKeyword {
                    keyword: None,
                    offset: Some(0),
                }
            },
            "invalid connection option",
        ),
        (
            "postgres://h/d?foo=1",
            |e| {
                *e == DsnError::UnknownKeyword {
                    keyword: Some("foo".into()),
                    offset: Some(15),
                }
            },
            "foo",
        ),
        (
            "postgres://h/d?ssl=false",
            |e| matches!(e, DsnError::UnknownKeyword { keyword: Some(k), .. } if k == "ssl"),
            "ssl",
        ),
        (
            "postgres://h/d?a",
            |e| matches!(e, DsnError::MalformedUri { offset: 15, .. }),
            "without \"=\"",
        ),
        (
            "postgres://h/d?&a=1",
            |e| matches!(e, DsnError::MalformedUri { offset: 15, .. }),
            "without \"=\"",
        ),
        (
            "postgres://h/d?a=b=c",
            |e| matches!(e, DsnError::MalformedUri { offset: 18, .. }),
            "extra \"=\"",
        ),
        (
            "postgres://[::1/d",
            |e| matches!(e, DsnError::MalformedUri { offset: 11, .. }),
            "\"]\"",
        ),
        (
            "postgres://[]/d",
            |e| matches!(e, DsnError::MalformedUri { offset: 11, .. }),
            "may not be empty",
        ),
        (
            "postgres://[::1]x/d",
            |e| matches!(e, DsnError::MalformedUri { offset: 16, .. }),
            "unexpected character",
        ),
        (
            "postgres://u:p%zz@h",
            |e| {
                matches!(
                    e,
                    DsnError::BadPercentEncoding {
                        part: "password",
                        offset: 14,
                        ..
                    }
                )
            },
            "two hex digits",
        ),
        (
            "postgres://u:p%4@h",
            |e| {
                matches!(
                    e,
                    DsnError::BadPercentEncoding {
                        part: "password",
                        ..
                    }
                )
            },
            "two hex digits",
        ),
        (
            "postgres://u%00@h",
            |e| {
                matches!(
                    e,
                    DsnError::BadPercentEncoding {
                        part: "user name",
                        offset: 12,
                        ..
                    }
                )
            },
            "%00",
        ),
        (
            "postgres://h%/d",
            |e| {
                matches!(
                    e,
                    DsnError::BadPercentEncoding {
                        part: "host",
                        offset: 12,
                        ..
                    }
                )
            },
            "host",
        ),
        (
            "postgres://h/d%",
            |e| {
                matches!(
                    e,
                    DsnError::BadPercentEncoding {
                        part: "database name",
                        ..
                    }
                )
            },
            "database name",
        ),
        (
            "postgres://h/d?a%=1",
            |e| {
                matches!(
                    e,
                    DsnError::BadPercentEncoding {
                        part: "query parameter name",
                        ..
                    }
                )
            },
            "query parameter name",
        ),
        (
            "postgres://h/d?host=%ff",
            |e| {
                matches!(
                    e,
                    DsnError::BadPercentEncoding {
                        part: "query parameter value",
                        ..
                    }
                )
            },
            "UTF-8",
        ),
        (
            "port=abc",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "port",
                        ..
                    }
                )
            },
            "not an integer",
        ),
        (
            "port=0",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "port",
                        ..
                    }
                )
            },
            "outside 1..65535",
        ),
        (
            "port=65536",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "port",
                        ..
                    }
                )
            },
            "outside 1..65535",
        ),
        (
            "postgres://h:99999/d",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "port",
                        ..
                    }
                )
            },
            "outside",
        ),
        (
            "host=a,b port=1,x",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "port",
                        ..
                    }
                )
            },
            "entry 2 of the list",
        ),
        (
            "postgres://h:5432:6/d",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "port",
                        ..
                    }
                )
            },
            "port",
        ),
        (
            "host=a,b,c port=1,2",
            |e| *e == DsnError::PortCount { ports: 2, hosts: 3 },
            "could not match 2 port numbers to 3 hosts",
        ),
        (
            "postgres://h1:1,h2:2/d?port=1,2,3",
            |e| *e == DsnError::PortCount { ports: 3, hosts: 2 },
            "port numbers",
        ),
        (
            "host=a,b hostaddr=10.0.0.1",
            |e| {
                *e == DsnError::HostaddrCount {
                    hosts: 2,
                    hostaddrs: 1,
                }
            },
            "hostaddr",
        ),
        (
            "hostaddr=db.example",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "hostaddr",
                        ..
                    }
                )
            },
            "numeric IP",
        ),
        (
            "sslmode=required",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "sslmode",
                        ..
                    }
                )
            },
            "verify-full",
        ),
        (
            "sslmode=",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "sslmode",
                        ..
                    }
                )
            },
            "sslmode",
        ),
        (
            "postgres://h?sslmode=Require",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "sslmode",
                        ..
                    }
                )
            },
            "sslmode",
        ),
        (
            "sslrootcert=system sslmode=require",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "sslmode",
                        ..
                    }
                )
            },
            "sslrootcert=system",
        ),
        (
            "connect_timeout=ten",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "connect_timeout",
                        ..
                    }
                )
            },
            "integer",
        ),
        (
            "connect_timeout=1.5",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "connect_timeout",
                        ..
                    }
                )
            },
            "integer",
        ),
        (
            "keepalives_idle=x",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "keepalives_idle",
                        ..
                    }
                )
            },
            "integer",
        ),
        (
            "gssencmode=yes",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "gssencmode",
                        ..
                    }
                )
            },
            "gssencmode",
        ),
        (
            "channel_binding=on",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "channel_binding",
                        ..
                    }
                )
            },
            "channel_binding",
        ),
        (
            "target_session_attrs=master",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "target_session_attrs",
                        ..
                    }
                )
            },
            "prefer-standby",
        ),
        (
            "load_balance_hosts=yes",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "load_balance_hosts",
                        ..
                    }
                )
            },
            "random",
        ),
        (
            "ssl_min_protocol_version=SSLv3",
            |e| {
                matches!(
                    e,
                    DsnError::InvalidValue {
                        keyword: "ssl_min_protocol_version",
                        ..
                    }
                )
            },
            "TLSv1.2",
        ),
    ];
    for (input, check, needle) in cases {
        let err = match Dsn::parse(input) {
            Ok(d) => panic!("{input:?} parsed as {d:?}"),
            Err(e) => e,
        };
        assert!(check(&err), "{input:?}: unexpected error {err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(needle),
            "{input:?}: message {msg:?} lacks {needle:?}"
        );
    }
}

#[test]
fn with_param_validates_and_overrides() {
    let d = Dsn::parse("postgres://u:p@h:5432/d?sslmode=disable").expect("parse");
    let d2 = d.clone().with_param("password", "n3w").expect("password");
    assert_eq!(d2.password(), Some("n3w"));
    assert_eq!(d2.user(), Some("u"));
    let d3 = d2
        .clone()
        .with_param("sslmode", "verify-full")
        .expect("sslmode");
    assert_eq!(d3.sslmode(), SslMode::VerifyFull);
    assert!(matches!(
        d.clone().with_param("sslmode", "bogus"),
        Err(DsnError::InvalidValue {
            keyword: "sslmode",
            ..
        })
    ));
    assert!(matches!(
        d.clone().with_param("port", "70000"),
        Err(DsnError::InvalidValue {
            keyword: "port",
            ..
        })
    ));
    assert_eq!(
        d.clone().with_param("nope", "x"),
        Err(DsnError::UnknownKeyword {
            keyword: Some("nope".into()),
            offset: None
        })
    );
    let three = d
        .clone()
        .with_param("host", "a,b,c")
        .expect("one port serves every host");
    assert_eq!(
        three.hosts(),
        vec![tcp("a", 5432), tcp("b", 5432), tcp("c", 5432)]
    );
    assert!(matches!(
        d.clone().with_param("port", "1,2"),
        Err(DsnError::PortCount { ports: 2, hosts: 1 })
    ));
    assert_eq!(
        d.clone()
            .with_param("requiressl", "1")
            .expect("alias")
            .sslmode(),
        SslMode::Require
    );
    let without = d.without_param("sslmode");
    assert_eq!(without.get("sslmode"), None);
    assert_eq!(without.sslmode(), SslMode::Prefer);
}

#[test]
fn expose_key_value_string_round_trips() {
    let mut inputs: Vec<String> = vec![
        "host=localhost port=5432 dbname=mydb connect_timeout=10".into(),
        "postgresql://host1:123,host2:456/somedb?target_session_attrs=any&application_name=myapp"
            .into(),
        "postgres://[fe80::1%25eth0]:5432,h2/d?sslmode=verify-full&sslrootcert=/etc/ca.pem".into(),
        "postgres:///d?host=/var/run/postgresql".into(),
        "host=a,,c port=1,,3 password='' options='-c search_path=\"a b\"'".into(),
        "user=jürgen dbname='déjà vu' application_name='x\\\\y'".into(),
        "hostaddr=127.0.0.1,::1 host=a,b port=5432".into(),
    ];
    for pw in tricky_passwords() {
        inputs.push(format!(
            "postgres://{}:{}@h:5432/db%20name?sslmode=require",
            enc("u s"),
            enc(&pw)
        ));
        inputs.push(format!("password={} host=h", quote(&pw)));
    }
    for input in &inputs {
        let d = Dsn::parse(input).unwrap_or_else(|e| panic!("{e}"));
        let kv = d.expose_key_value_string();
        let again =
            Dsn::parse(&kv).unwrap_or_else(|e| panic!("re-parsing the exposed string: {e}"));
        assert_eq!(again, d);
        assert_eq!(again.expose_key_value_string(), kv);
    }
    let d =
        Dsn::parse("postgres://u:p@h/d?sslrootcert=/ca.pem&application_name=a%20b").expect("parse");
    assert_eq!(
        d.expose_key_value_string_with(|k| k != "sslrootcert"),
        "user=u password=p dbname=d host=h application_name='a b'"
    );
    let d = Dsn::parse("postgres://u:p%27%5C@h/d").expect("parse");
    assert_eq!(
        d.expose_key_value_string(),
        "user=u password='p\\'\\\\' dbname=d host=h"
    );
}

/// `Display` is a redacted URI that parses back to the same connection target.
#[test]
fn display_is_a_redacted_uri() {
    let d = Dsn::parse(
        "host=db.example,/var/run/pg,::1 port=1,2,3 user='us er' password=hunter2 dbname=app sslmode=require sslpassword=kp",
    )
    .expect("parse");
    let shown = d.to_string();
    assert_eq!(
        shown,
        "postgres://us%20er:***@db.example:1,%2Fvar%2Frun%2Fpg:2,[::1]:3/app?sslmode=require&sslpassword=***"
    );
    let back = Dsn::parse(&shown).expect("Display output parses");
    assert_eq!(back.hosts(), d.hosts());
    assert_eq!(back.user(), d.user());
    assert_eq!(back.dbname(), d.dbname());
    assert_eq!(back.sslmode(), d.sslmode());
    assert_eq!(
        Dsn::parse("postgresql://").expect("empty").to_string(),
        "postgres://localhost:5432"
    );
}

/// No output derived from a DSN (Debug, Display, any error) contains its password, nor a
/// fragment of it when a mis-quoted password spills into the next word.
#[test]
fn secrets_never_leak() {
    const PW: &str = "Zq7xKv9Wm";
    const PW2: &str = "Rt4yQp8Ln";
    let secret_kw = [
        "password",
        "sslpassword",
        "oauth_client_secret",
        "scram_client_key",
        "scram_server_key",
    ];
    let mut good: Vec<String> = Vec::new();
    for kw in secret_kw {
        good.push(format!("host=h {kw}={PW}"));
        good.push(format!("postgres://h/d?{kw}={PW}"));
    }
    good.push(format!("postgres://u:{PW}@h/d"));
    good.push(format!("postgres://u:{PW}%20{PW2}@h/d"));
    for input in &good {
        let d = Dsn::parse(input).unwrap_or_else(|e| panic!("{e}"));
        for out in [format!("{d:?}"), format!("{d:#?}"), d.to_string()] {
            assert!(!out.contains(PW) && !out.contains(PW2), "leaked in {out}");
            assert!(out.contains("***"), "secret not marked as redacted: {out}");
        }
        // Errors raised while modifying a DSN holding a secret do not show it either.
        for (k, v) in [
            ("port", "x"),
            ("sslmode", "x"),
            ("bogus", "x"),
            ("host", "a,b,c,d"),
        ] {
            if let Err(e) = d
                .clone()
                .with_param(k, v)
                .and_then(|d| d.with_param("port", "1,2"))
            {
                let msg = format!("{e} {e:?}");
                assert!(!msg.contains(PW) && !msg.contains(PW2), "leaked in {msg}");
            }
        }
    }
    let bad: Vec<String> = vec![
        format!("password={PW} {PW2}"),
        format!("password={PW} {PW2}=x"),
        format!("password={PW} {PW2}=x host=h"),
        format!("password='{PW} {PW2}"),
        PW.to_string(),
        format!("{PW}=x"),
        format!("host=h {PW}"),
        format!("postgres://u:{PW}@h/d?x={PW2}"),
        format!("postgres://u:{PW}%zz@h/d"),
        format!("postgres://u:{PW}%00@h/d"),
        format!("postgres://u:{PW}%ff@h/d"),
        format!("postgres://u:{PW}@h/d?{PW2}"),
        format!("postgres://u:{PW}@h/d?password={PW2}={PW}"),
        format!("postgres://u:{PW}@h:{PW2}/d"),
        format!("postgres://u:{PW}@[{PW2}/d"),
        format!("postgres://u:{PW}@[::1]{PW2}/d"),
        format!("postgres://u:{PW}@h/d?port={PW2}"),
        format!("postgres://u:{PW}@h/d?sslmode={PW2}"),
        format!("postgres://u:{PW}@h/d?hostaddr={PW2}"),
        format!("postgres://u:{PW}@h/d?connect_timeout={PW2}"),
        format!("postgres://u:{PW}@a:1,b:2/d?port=1,2,3"),
        format!("{PW}://u:{PW2}@h/d"),
        format!("host=h password={PW} port={PW2}"),
        format!("host=h password={PW} sslmode={PW2}"),
        format!("password={PW}\0{PW2}"),
    ];
    for input in &bad {
        let Err(e) = Dsn::parse(input) else {
            panic!(
                "input #{} unexpectedly parsed",
                bad.iter().position(|b| b == input).unwrap_or(0)
            );
        };
        let msg = format!("{e} | {e:?}");
        assert!(!msg.contains(PW) && !msg.contains(PW2), "leaked in {msg}");
    }
}

#[test]
fn secret_dir_reads_db_controller_layout() {
    for pw in tricky_passwords() {
        let dir = SecretDir::new().expect("secret dir");
        dir.write(&[
            ("hostname", b"db.example\n"),
            ("port", b"6432"),
            ("database", b"app"),
            ("username", b"myapp_a"),
            ("password", pw.as_bytes()),
            ("sslmode", b"require\n"),
            ("uri_dsn.txt", b"not: even a dsn"),
        ])
        .expect("write");
        let d = Dsn::from_secret_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.password(), Some(pw.as_str()));
        assert_eq!(d.user(), Some("myapp_a"));
        assert_eq!(d.dbname(), Some("app"));
        assert_eq!(d.sslmode(), SslMode::Require);
        assert_eq!(d.hosts(), vec![tcp("db.example", 6432)]);
    }
}

#[test]
fn secret_dir_trimming_defaults_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write =
        |name: &str, data: &[u8]| std::fs::write(dir.path().join(name), data).expect("write");
    write("hostname", b"  h  \n");
    write("database", b"d\r\n");
    write("username", b"u\n");
    // One trailing newline is dropped; everything else is kept.
    write("password", b" p w \n\n");
    let d = Dsn::from_secret_dir(dir.path()).expect("read");
    assert_eq!(d.password(), Some(" p w \n"));
    assert_eq!(d.hosts(), vec![tcp("h", 5432)], "port defaults to 5432");
    assert_eq!(d.dbname(), Some("d"));
    assert_eq!(d.sslmode(), SslMode::Prefer);
    write("password", b"crlf\r\n");
    assert_eq!(
        Dsn::from_secret_dir(dir.path()).expect("read").password(),
        Some("crlf")
    );
    write("password", b"");
    assert_eq!(
        Dsn::from_secret_dir(dir.path()).expect("read").password(),
        Some("")
    );

    write("password", b"Zq7xKv9Wm");
    write("port", b"Zq7xKv9Wm");
    let e = Dsn::from_secret_dir(dir.path()).expect_err("bad port");
    assert!(
        matches!(&e, DsnError::SecretFileValue { file: "port", cause } if matches!(**cause, DsnError::InvalidValue { keyword: "port", .. })),
        "{e:?}"
    );
    assert!(!e.to_string().contains("Zq7xKv9Wm"), "{e}");
    write("port", b"5433\n");
    write("sslmode", b"nope");
    let e = Dsn::from_secret_dir(dir.path()).expect_err("bad sslmode");
    assert!(e.to_string().contains("sslmode"), "{e}");
    std::fs::remove_file(dir.path().join("sslmode")).expect("rm");

    write("hostname", b" \n");
    let e = Dsn::from_secret_dir(dir.path()).expect_err("empty hostname");
    assert!(
        matches!(
            e,
            DsnError::SecretFileUnusable {
                file: "hostname",
                ..
            }
        ),
        "{e:?}"
    );
    write("hostname", b"h");

    write("username", &[0xff, 0xfe]);
    let e = Dsn::from_secret_dir(dir.path()).expect_err("not UTF-8");
    assert!(
        matches!(
            e,
            DsnError::SecretFileUnusable {
                file: "username",
                ..
            }
        ),
        "{e:?}"
    );
    write("username", b"u");

    write("password", &vec![b'x'; 100 * 1024]);
    let e = Dsn::from_secret_dir(dir.path()).expect_err("too large");
    assert!(
        matches!(
            e,
            DsnError::SecretFileUnusable {
                file: "password",
                ..
            }
        ),
        "{e:?}"
    );

    for file in ["hostname", "database", "username", "password"] {
        let sub = tempfile::tempdir().expect("tempdir");
        for other in ["hostname", "database", "username", "password"] {
            if other != file {
                std::fs::write(sub.path().join(other), b"x").expect("write");
            }
        }
        let e = Dsn::from_secret_dir(sub.path()).expect_err("missing");
        assert!(
            matches!(&e, DsnError::SecretFileMissing { file: f, .. } if *f == file),
            "{e:?}"
        );
        assert!(e.to_string().contains(&format!("\"{file}\"")), "{e}");
    }
    let e = Dsn::from_secret_dir(&dir.path().join("nope")).expect_err("no dir");
    assert!(
        matches!(
            e,
            DsnError::SecretFileMissing {
                file: "hostname",
                ..
            }
        ),
        "{e:?}"
    );
}

/// Runs `psql` (real libpq) with `conninfo` and returns `current_user`, or psql's stderr.
fn psql_current_user(conninfo: &str) -> Result<String, String> {
    let bin = PgCluster::bin_dir()
        .map_err(|e| e.to_string())?
        .join("psql");
    let out = Command::new(&bin)
        .args([
            "-X",
            "-A",
            "-t",
            "-w",
            "-c",
            "select current_user",
            "-d",
            conninfo,
        ])
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        .env("PGPASSFILE", "/nonexistent")
        .output()
        .map_err(|e| {
            format!(
                "running {}: {e} (install the PostgreSQL client, e.g. postgresql-client)",
                bin.display()
            )
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        // psql's error may echo the connection string; never print it.
        Err(format!("psql failed with {}", out.status))
    }
}

/// Credentials parsed from either form log in to a real PostgreSQL through libpq, and the
/// exposed key=value string is accepted by libpq itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parsed_credentials_log_in_to_postgres() {
    let cluster = PgCluster::start().expect("start PostgreSQL");
    for (i, pw) in tricky_passwords().iter().enumerate() {
        // Server-side passwords cannot hold a NUL and leading/trailing spaces are fine.
        let role = format!("dsn_user_{i}");
        cluster
            .create_role(&role, pw, PasswordKind::Scram)
            .await
            .expect("create role");

        let uri = cluster.uri(&role, pw, "postgres");
        let from_uri = Dsn::parse(&uri).expect("parse harness URI");
        assert_eq!(from_uri.password(), Some(pw.as_str()));
        assert_eq!(
            psql_current_user(&from_uri.expose_key_value_string())
                .expect("login with the URI's credentials"),
            role
        );

        let kv = format!(
            "host={} port={} user={role} password={} dbname=postgres sslmode=disable",
            cluster.host(),
            cluster.port(),
            quote(pw)
        );
        let from_kv = Dsn::parse(&kv).expect("parse key=value");
        assert_eq!(from_kv, from_uri, "both forms give the same DSN");

        let client = cluster
            .connect(
                from_kv.user().expect("user"),
                from_kv.password().expect("password"),
                from_kv.dbname().expect("dbname"),
            )
            .await
            .expect("tokio-postgres login with parsed credentials");
        let row = client
            .query_one("select current_user::text", &[])
            .await
            .expect("query");
        assert_eq!(row.get::<_, String>(0), role);
    }
    // A wrong password is refused: the check above is not vacuous.
    let wrong = Dsn::parse(&cluster.uri("dsn_user_0", "wrong", "postgres")).expect("parse");
    assert!(psql_current_user(&wrong.expose_key_value_string()).is_err());
}

/// The C side of [`matches_libpq_conninfo_parse`]: reads hex-encoded connection strings, one
/// a line, and prints libpq's `PQconninfoParse` result as `key=hexvalue` pairs or `ERR`.
const PQPARSE_C: &str = r#"
#include <stdio.h>
#include <libpq-fe.h>
int main(void) {
    static char line[65536], buf[32768];
    while (fgets(line, sizeof line, stdin)) {
        int n = 0;
        for (char *p = line; p[0] && p[1] && p[0] != '\n'; p += 2) {
            unsigned v; sscanf(p, "%2x", &v); buf[n++] = (char) v;
        }
        buf[n] = 0;
        char *err = NULL;
        PQconninfoOption *o = PQconninfoParse(buf, &err);
        if (!o) { printf("ERR\n"); if (err) PQfreemem(err); continue; }
        for (PQconninfoOption *q = o; q->keyword; q++) if (q->val) {
            printf(" %s=", q->keyword);
            for (char *c = q->val; *c; c++) printf("%02x", (unsigned char) *c);
        }
        printf("\n");
        PQconninfoFree(o);
    }
    return 0;
}
"#;

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Differential test against the real libpq: thousands of generated connection strings,
/// dense in delimiters, quotes, escapes and percent signs, must give the same parameters as
/// `PQconninfoParse` (or both fail). Allowed differences are the documented ones: we check
/// values at parse time, refuse empty text, trim a URI's trailing whitespace, and require
/// UTF-8.
#[test]
fn matches_libpq_conninfo_parse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("pqparse.c");
    let bin = dir.path().join("pqparse");
    std::fs::write(&src, PQPARSE_C).expect("write C source");
    let include = Command::new("pg_config")
        .arg("--includedir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "/usr/include/postgresql".into());
    let cc = Command::new("cc")
        .arg(&src)
        .arg(format!("-I{include}"))
        .arg("-lpq")
        .arg("-o")
        .arg(&bin)
        .output()
        .expect("running cc: install a C compiler (apt-get install gcc)");
    assert!(
        cc.status.success(),
        "compiling against libpq failed (apt-get install libpq-dev): {}",
        String::from_utf8_lossy(&cc.stderr)
    );

    let atoms = [
        "host", "port", "user", "password", "dbname", "options", "=", "=", "=", " ", "  ", "\t",
        "'", "'", "\\", "a", "b", "%", "%2F", "%41", "%C3%A9", "@", ":", "/", "?", "&", ",", "[",
        "]", "::1", "5432", "x", "é", "#", "ssl", "true",
    ];
    let ws: &[char] = &[' ', '\t', '\n', '\u{b}', '\u{c}', '\r'];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let mut cases = Vec::new();
    while cases.len() < 20_000 {
        let mut s = match next(4) {
            0 => "postgres://".to_string(),
            1 => "postgresql://".to_string(),
            _ => String::new(),
        };
        for _ in 0..1 + next(12) {
            s.push_str(atoms[next(atoms.len())]);
        }
        // Documented differences, not compared: trailing URI whitespace and empty text.
        let s = if s.starts_with("postgres") {
            s.trim_end_matches(ws).to_string()
        } else {
            s
        };
        if !s.trim_matches(ws).is_empty() {
            cases.push(s);
        }
    }
    let input: String = cases.iter().map(|c| hex(c) + "\n").collect();
    let mut child = Command::new(&bin)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run the libpq helper");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin
            .write_all(input.as_bytes())
            .expect("feed the libpq helper");
    });
    let out = child.wait_with_output().expect("libpq helper output");
    writer.join().expect("writer thread");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), cases.len(), "libpq helper answered every case");

    let (mut same, mut both_fail, mut we_check_values) = (0, 0, 0);
    for (case, line) in cases.iter().zip(&lines) {
        let theirs: Option<BTreeMap<String, String>> = (line != "ERR").then(|| {
            line.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        });
        let ours = Dsn::parse(case).map(|d| {
            d.params()
                .map(|(k, v)| (k.to_string(), hex(v)))
                .collect::<BTreeMap<_, _>>()
        });
        match (theirs, ours) {
            (None, Err(_)) => both_fail += 1,
            (Some(t), Ok(o)) if t == o => same += 1,
            (
                Some(_),
                Err(
                    DsnError::InvalidValue { .. }
                    | DsnError::PortCount { .. }
                    | DsnError::HostaddrCount { .. }
                    | DsnError::BadPercentEncoding {
                        problem: "the decoded bytes are not valid UTF-8",
                        ..
                    },
                ),
            ) => we_check_values += 1,
            (t, o) => panic!("differs from libpq on {case:?}: libpq {t:?}, ours {o:?}"),
        }
    }
    eprintln!(
        "libpq comparison: {same} identical, {both_fail} rejected by both, \
         {we_check_values} rejected only by our value checks"
    );
    // The generator must exercise all three outcomes, or the comparison proves little.
    assert!(
        same > 2000 && both_fail > 2000 && we_check_values > 200,
        "{same} {both_fail} {we_check_values}"
    );
}
