//! PostgreSQL: connections (over TLS as `DATABASE_URL` says), the pool and the migrations.
//!
//! Migrations live in `migrations/`, compiled into the binary. A migration is either one file
//! (`NNNN_name.sql`) or a pair of flavours (`NNNN_name.timescale.sql`, `NNNN_name.postgres.sql`):
//! the TimescaleDB flavour is used when the extension is available to the database, the plain
//! PostgreSQL one otherwise. The flavour is decided once, when the first flavoured migration is
//! applied, and recorded with each migration in `schema_migration`.
//!
//! Every connection goes through [`parse_url`], which reads `sslmode` and `sslrootcert` the way
//! libpq does; [`tls`] says what each mode checks.
//!
//! [`migrate`] holds a PostgreSQL advisory lock for its whole run, so several processes may
//! call it at once; each migration runs in its own transaction, and applied ones are skipped.

use anyhow::{Context as _, bail};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::fmt;

pub mod tls;

/// Which schema the database gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// TimescaleDB: `tag_reading` is a hypertable with compression and retention policies.
    Timescale,
    /// Plain PostgreSQL: `tag_reading` is an indexed table.
    Postgres,
}

impl Flavor {
    fn as_str(self) -> &'static str {
        match self {
            Flavor::Timescale => "timescale",
            Flavor::Postgres => "postgres",
        }
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavor::Timescale => "TimescaleDB",
            Flavor::Postgres => "plain PostgreSQL",
        })
    }
}

enum Sql {
    Both(&'static str),
    Flavored {
        timescale: &'static str,
        postgres: &'static str,
    },
}

struct Migration {
    version: i32,
    name: &'static str,
    sql: Sql,
}

/// Every migration, in order. A test checks that this list and `migrations/` agree.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "registry",
        sql: Sql::Both(include_str!("../../migrations/0001_registry.sql")),
    },
    Migration {
        version: 2,
        name: "tag_reading",
        sql: Sql::Flavored {
            timescale: include_str!("../../migrations/0002_tag_reading.timescale.sql"),
            postgres: include_str!("../../migrations/0002_tag_reading.postgres.sql"),
        },
    },
    Migration {
        version: 3,
        name: "users",
        sql: Sql::Both(include_str!("../../migrations/0003_users.sql")),
    },
    Migration {
        version: 4,
        name: "ingested_at",
        sql: Sql::Both(include_str!("../../migrations/0004_ingested_at.sql")),
    },
    Migration {
        version: 5,
        name: "ingested_keys",
        sql: Sql::Both(include_str!("../../migrations/0005_ingested_keys.sql")),
    },
    Migration {
        version: 6,
        name: "retention_ranges",
        sql: Sql::Both(include_str!("../../migrations/0006_retention_ranges.sql")),
    },
];

/// An arbitrary constant naming the migration lock among the database's advisory locks.
const MIGRATION_LOCK: i64 = 0x6461_7461_7669_7a00;

/// How a connection uses TLS: libpq's `sslmode`, in `DATABASE_URL`'s query (`prefer` when
/// absent). What each mode checks: the table in [`tls`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it, plain otherwise.
    Prefer,
    /// TLS or no connection.
    Require,
    /// TLS, and the server's certificate signed by `sslrootcert`.
    VerifyCa,
    /// TLS, and the server's certificate signed by `sslrootcert` (or one of the system's CAs)
    /// for the host name connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, DatabaseUrlError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(DatabaseUrlError::Unsupported(
                    "sslmode=allow (plain first, TLS only when the server insists): use prefer",
                ));
            }
            other => return Err(DatabaseUrlError::UnknownSslMode(other.to_owned())),
        })
    }
}

/// The CA certificates a server's certificate is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    /// `sslrootcert=<path>`: a PEM file of one or more CA certificates.
    File(std::path::PathBuf),
    /// `sslrootcert=system`, or `verify-full` without `sslrootcert`: the operating system's CA
    /// certificates.
    System,
}

/// A `DATABASE_URL`, parsed and checked: the settings tokio-postgres takes, and the TLS ones it
/// does not know (`verify-ca`, `verify-full`, `sslrootcert`). Only [`parse_url`] makes one.
#[derive(Debug, Clone)]
pub struct DatabaseUrl {
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    root_certs: Option<RootCerts>,
}

impl DatabaseUrl {
    /// Host, port, user, database, ... (the password is redacted in its `Debug`).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// Where the CA certificates come from; `None`: no certificate is checked.
    pub fn root_certs(&self) -> Option<&RootCerts> {
        self.root_certs.as_ref()
    }
}

/// Why a `DATABASE_URL` cannot be used. The messages name the variable and never repeat the URL
/// (it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum DatabaseUrlError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL")]
    Invalid(#[source] tokio_postgres::Error),
    #[error(
        "DATABASE_URL: unknown sslmode {0:?} (disable, prefer, require, verify-ca or verify-full)"
    )]
    UnknownSslMode(String),
    #[error("DATABASE_URL: {0} is not supported")]
    Unsupported(&'static str),
    #[error(
        "DATABASE_URL: sslmode=verify-ca needs sslrootcert, the CA certificate (PEM) that signed \
         the server's (any public CA would do otherwise, for any name: use verify-full for those)"
    )]
    VerifyCaWithoutRootCert,
    #[error(
        "DATABASE_URL: sslrootcert=system needs sslmode=verify-full (the system's CAs sign \
         certificates for anyone: only the host name check makes them mean something)"
    )]
    SystemRootsWithoutVerifyFull,
    #[error("DATABASE_URL: sslrootcert {}: {reason}", path.display())]
    RootCert {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(
        "DATABASE_URL: sslmode=verify-full without sslrootcert checks the server against the \
         system's CA certificates, and none were found ({0}): install ca-certificates, or give \
         sslrootcert"
    )]
    NoSystemRoots(String),
}

/// Parses a `DATABASE_URL` (`postgres://user:password@host:port/dbname?params`), in one place
/// for every connection:
/// - `sslmode` (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`; `prefer` when
///   absent) and `sslrootcert` (a PEM file of CA certificates, or `system`) are taken out, as
///   tokio-postgres knows neither the `verify-*` modes nor `sslrootcert`; see [`tls`] for what
///   each mode checks.
/// - The query parameters Symfony adds for Doctrine (`serverVersion`, `charset`), which
///   PostgreSQL clients do not know, are dropped.
/// - The client-certificate parameters (`sslcert`, `sslkey`, `sslpassword`) are refused rather
///   than ignored.
///
/// The CA file is not read here but when a pool or connection is made ([`pool`], [`connect`]).
pub fn parse_url(url: &str) -> Result<DatabaseUrl, DatabaseUrlError> {
    let decode = |v: &str| {
        percent_encoding::percent_decode_str(v)
            .decode_utf8_lossy()
            .into_owned()
    };
    let (mut ssl_mode, mut root_cert) = (None, None);
    let cleaned = match url.split_once('?') {
        Some((base, query)) => {
            let mut kept: Vec<&str> = Vec::new();
            for kv in query.split('&') {
                let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
                match key {
                    "serverVersion" | "charset" | "" => {}
                    "sslmode" => ssl_mode = Some(SslMode::parse(&decode(value))?),
                    "sslrootcert" => root_cert = Some(decode(value)),
                    "sslcert" | "sslkey" | "sslpassword" => {
                        return Err(DatabaseUrlError::Unsupported(
                            "a client certificate (sslcert, sslkey, sslpassword)",
                        ));
                    }
                    _ => kept.push(kv),
                }
            }
            if kept.is_empty() {
                base.to_owned()
            } else {
                format!("{base}?{}", kept.join("&"))
            }
        }
        None => url.to_owned(),
    };
    let mut config: tokio_postgres::Config = cleaned.parse().map_err(DatabaseUrlError::Invalid)?;
    // Not in the query: what tokio-postgres read (a key=value string may name it), else prefer.
    let ssl_mode = ssl_mode.unwrap_or(match config.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => SslMode::Disable,
        tokio_postgres::config::SslMode::Prefer => SslMode::Prefer,
        _ => SslMode::Require,
    });
    let root_certs = match (root_cert.as_deref(), ssl_mode) {
        (Some("system"), SslMode::VerifyFull) => Some(RootCerts::System),
        (Some("system"), _) => return Err(DatabaseUrlError::SystemRootsWithoutVerifyFull),
        (Some(path), _) => Some(RootCerts::File(path.into())),
        (None, SslMode::VerifyFull) => Some(RootCerts::System),
        (None, SslMode::VerifyCa) => return Err(DatabaseUrlError::VerifyCaWithoutRootCert),
        (None, _) => None,
    };
    // tokio-postgres negotiates; the verify-* modes are `require` to it, the rest is tls.rs's.
    config.ssl_mode(match ssl_mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    Ok(DatabaseUrl {
        config,
        ssl_mode,
        root_certs,
    })
}

/// The columns of `tag_reading` a reading fills, in order, with their types: the one definition
/// of the row that the writer copies (and its benchmark and tests with it).
pub const TAG_READING_COLUMNS: &str = "time, device_id, tag_id, gateway_id, value_num, value_bool, value_text, value_json, value_type";
pub const TAG_READING_TYPES: [tokio_postgres::types::Type; 9] = {
    use tokio_postgres::types::Type;
    [
        Type::TIMESTAMPTZ,
        Type::INT8,
        Type::INT8,
        Type::INT4,
        Type::FLOAT8,
        Type::BOOL,
        Type::TEXT,
        Type::JSONB,
        Type::TEXT,
    ]
};

/// The binary COPY of readings into `table` (`tag_reading`, or a table of the same columns).
pub fn copy_readings(table: &str) -> String {
    format!("COPY {table} ({TAG_READING_COLUMNS}) FROM STDIN BINARY")
}

/// Whether retrying can cure a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Not the data's fault (connection, pool, server, a conflict between transactions): the
    /// same work may succeed later.
    Transient,
    /// PostgreSQL refuses the data itself: the same work fails again, whenever it runs.
    Permanent,
}

impl ErrorKind {
    /// The kind of an error with this SQLSTATE. Permanent: data exceptions (class 22: a value
    /// out of range, an invalid encoding), integrity constraint violations (23) and program
    /// limits (54: an index row or a statement too large). Everything else is transient, from
    /// a lost connection (08) to a serialization failure (40) or a server shutting down (57):
    /// retrying a message that is not at fault costs a delay, dead-lettering it would lose it.
    pub fn of_sqlstate(code: &tokio_postgres::error::SqlState) -> ErrorKind {
        match code.code().get(..2) {
            Some("22" | "23" | "54") => ErrorKind::Permanent,
            _ => ErrorKind::Transient,
        }
    }
}

/// A database error with its [`ErrorKind`], decided by type and SQLSTATE, never by its text.
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
pub struct DbError {
    kind: ErrorKind,
    code: Option<tokio_postgres::error::SqlState>,
    text: String,
}

impl DbError {
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The SQLSTATE, when PostgreSQL answered with one.
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        self.code.as_ref()
    }

    /// A transient error of our own making (say, a row that vanished between two queries).
    pub fn transient(text: impl Into<String>) -> DbError {
        DbError {
            kind: ErrorKind::Transient,
            code: None,
            text: text.into(),
        }
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => DbError {
                kind: ErrorKind::of_sqlstate(db.code()),
                code: Some(db.code().clone()),
                text: format!("{}: {}", db.code().code(), db.message()),
            },
            None => DbError {
                kind: ErrorKind::Transient,
                code: e.code().cloned(),
                text: e.to_string(),
            },
        }
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        DbError::transient(e.to_string())
    }
}

/// A pool of connections; connections are opened lazily and checked on reuse. Fails at once on
/// a bad `DATABASE_URL` or an unreadable `sslrootcert`.
pub fn pool(url: &str, size: usize) -> anyhow::Result<Pool> {
    let url = parse_url(url)?;
    let manager = Manager::from_config(
        url.config.clone(),
        tls::connector(&url)?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .build()
        .context("building the PostgreSQL pool")
}

/// Opens one connection, for work outside the pool (migrations).
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let url = parse_url(url)?;
    let (client, connection) = url
        .config
        .connect(tls::connector(&url)?)
        .await
        .context("connecting to DATABASE_URL")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub flavor: Flavor,
    /// Names of the migrations applied by this call.
    pub applied: Vec<String>,
    /// Migrations that were already there.
    pub already: usize,
}

/// Applies the migrations not yet applied. Safe to run twice, and from several processes.
pub async fn migrate(client: &mut tokio_postgres::Client) -> anyhow::Result<MigrationReport> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .context("taking the migration lock")?;
    let result = migrate_locked(client).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    let report = result?;
    unlock.context("releasing the migration lock")?;
    Ok(report)
}

async fn migrate_locked(client: &mut tokio_postgres::Client) -> anyhow::Result<MigrationReport> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migration (
                 version    integer PRIMARY KEY,
                 name       text        NOT NULL,
                 flavor     text,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .context("creating schema_migration")?;
    let rows = client
        .query("SELECT version, flavor FROM schema_migration", &[])
        .await?;
    let applied: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    let recorded: Option<String> = rows.iter().find_map(|r| r.get(1));
    let flavor = match recorded.as_deref() {
        Some("timescale") => Flavor::Timescale,
        Some("postgres") => Flavor::Postgres,
        Some(other) => bail!("schema_migration records an unknown flavor {other:?}"),
        None if timescale_available(client).await? => Flavor::Timescale,
        None => Flavor::Postgres,
    };
    let mut report = MigrationReport {
        flavor,
        applied: Vec::new(),
        already: applied.len(),
    };
    for migration in MIGRATIONS {
        if applied.contains(&migration.version) {
            continue;
        }
        let (sql, recorded_flavor) = match migration.sql {
            Sql::Both(sql) => (sql, None),
            Sql::Flavored {
                timescale,
                postgres,
            } => match flavor {
                Flavor::Timescale => (timescale, Some(flavor.as_str())),
                Flavor::Postgres => (postgres, Some(flavor.as_str())),
            },
        };
        let tx = client.transaction().await?;
        if recorded_flavor == Some("timescale") {
            tx.batch_execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                .await
                .context("creating the timescaledb extension")?;
        }
        tx.batch_execute(sql).await.with_context(|| {
            format!(
                "applying migration {:04}_{}",
                migration.version, migration.name
            )
        })?;
        tx.execute(
            "INSERT INTO schema_migration (version, name, flavor) VALUES ($1, $2, $3)",
            &[&migration.version, &migration.name, &recorded_flavor],
        )
        .await?;
        tx.commit().await?;
        report
            .applied
            .push(format!("{:04}_{}", migration.version, migration.name));
    }
    Ok(report)
}

async fn timescale_available(client: &tokio_postgres::Client) -> anyhow::Result<bool> {
    let row = client
        .query_opt(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'",
            &[],
        )
        .await
        .context("looking for the timescaledb extension")?;
    Ok(row.is_some())
}

/// Fails unless every migration this binary knows has been applied.
pub async fn check_migrated(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    let applied: i64 = match client
        .query_one("SELECT count(*) FROM schema_migration", &[])
        .await
    {
        Ok(row) => row.get(0),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => 0,
        Err(e) => return Err(e).context("reading schema_migration"),
    };
    if applied < MIGRATIONS.len() as i64 {
        bail!(
            "the database is not migrated ({applied} of {} migrations applied): run `dataviz migrate`",
            MIGRATIONS.len()
        );
    }
    Ok(())
}

/// Describes the database for the start-up log: server version and flavour.
pub async fn describe(client: &tokio_postgres::Client) -> anyhow::Result<String> {
    let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    let timescale: Option<String> = client
        .query_opt(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    Ok(match timescale {
        Some(ts) => {
            format!("PostgreSQL {version} with TimescaleDB {ts}: tag_reading is a hypertable")
        }
        None => format!(
            "PostgreSQL {version} without TimescaleDB: tag_reading is a plain indexed table"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symfony_parameters_are_dropped() {
        let c =
            parse_url("postgresql://app:secret@db:5432/app?serverVersion=15&charset=utf8").unwrap();
        assert_eq!(c.config().get_dbname(), Some("app"));
        let c = parse_url("postgres://u@h/db?serverVersion=15&application_name=x").unwrap();
        assert_eq!(c.config().get_application_name(), Some("x"));
        assert!(parse_url("not a url at all ://").is_err());
    }

    fn tokio_mode(url: &DatabaseUrl) -> tokio_postgres::config::SslMode {
        url.config().get_ssl_mode()
    }

    #[test]
    fn every_sslmode_is_read_and_handed_to_tokio_postgres_as_it_knows_it() {
        use tokio_postgres::config::SslMode as Tp;
        let ca = "sslrootcert=/etc/dataviz/ca.pem";
        let cases = [
            ("", SslMode::Prefer, Tp::Prefer),
            ("?sslmode=disable", SslMode::Disable, Tp::Disable),
            ("?sslmode=prefer", SslMode::Prefer, Tp::Prefer),
            ("?sslmode=require", SslMode::Require, Tp::Require),
            (
                &format!("?sslmode=verify-ca&{ca}"),
                SslMode::VerifyCa,
                Tp::Require,
            ),
            ("?sslmode=verify-full", SslMode::VerifyFull, Tp::Require),
            (
                &format!("?{ca}&sslmode=verify-full"),
                SslMode::VerifyFull,
                Tp::Require,
            ),
        ];
        for (query, mode, tokio) in cases {
            let url = parse_url(&format!("postgres://u:secret@db.example:5433/app{query}"))
                .unwrap_or_else(|e| panic!("{query}: {e}"));
            assert_eq!(url.ssl_mode(), mode, "{query}");
            assert_eq!(tokio_mode(&url), tokio, "{query}");
            assert_eq!(url.config().get_dbname(), Some("app"), "{query}");
            assert_eq!(url.config().get_ports(), [5433], "{query}");
        }
        // A key=value string is left to tokio-postgres, sslmode included.
        let url = parse_url("host=db user=u sslmode=require").unwrap();
        assert_eq!(url.ssl_mode(), SslMode::Require);
        assert_eq!(url.root_certs(), None);
    }

    #[test]
    fn sslrootcert_names_a_file_or_the_system_store_and_is_never_passed_on() {
        let url = parse_url(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Frun%2Fsecrets%2Fca%20file.pem&application_name=w",
        )
        .unwrap();
        assert_eq!(
            url.root_certs(),
            Some(&RootCerts::File("/run/secrets/ca file.pem".into()))
        );
        assert_eq!(url.config().get_application_name(), Some("w"));
        // verify-full without one: the system's CAs; with `system`: the same.
        for query in [
            "sslmode=verify-full",
            "sslmode=verify-full&sslrootcert=system",
        ] {
            let url = parse_url(&format!("postgres://u@h/db?{query}")).unwrap();
            assert_eq!(url.root_certs(), Some(&RootCerts::System), "{query}");
        }
        // require with a CA file: checked against it (libpq's verify-ca); without: nothing checked.
        let url = parse_url("postgres://u@h/db?sslmode=require&sslrootcert=ca.pem").unwrap();
        assert_eq!(url.root_certs(), Some(&RootCerts::File("ca.pem".into())));
        let url = parse_url("postgres://u@h/db?sslmode=require").unwrap();
        assert_eq!(url.root_certs(), None);
        // Symfony's parameters still go, beside the TLS ones.
        let url = parse_url(
            "postgresql://u@h/db?serverVersion=16&charset=utf8&sslmode=verify-ca&sslrootcert=ca.pem",
        )
        .unwrap();
        assert_eq!(url.ssl_mode(), SslMode::VerifyCa);
    }

    #[test]
    fn bad_tls_settings_are_refused_naming_database_url_and_not_the_password() {
        let cases = [
            ("sslmode=verify_full", "unknown sslmode \"verify_full\""),
            ("sslmode=", "unknown sslmode \"\""),
            ("sslmode=allow", "sslmode=allow"),
            ("sslmode=verify-ca", "verify-ca needs sslrootcert"),
            (
                "sslmode=require&sslrootcert=system",
                "needs sslmode=verify-full",
            ),
            (
                "sslmode=verify-ca&sslrootcert=system",
                "needs sslmode=verify-full",
            ),
            (
                "sslmode=require&sslcert=c.pem&sslkey=k.pem",
                "client certificate",
            ),
            ("sslnegotiation=sideways", "not a valid PostgreSQL URL"),
        ];
        for (query, expected) in cases {
            let err = parse_url(&format!("postgres://u:hunter2@h/db?{query}"))
                .map(|_| ())
                .expect_err(query);
            let message = format!("{:#}", anyhow::Error::from(err));
            assert!(message.starts_with("DATABASE_URL"), "{query}: {message}");
            assert!(message.contains(expected), "{query}: {message}");
            assert!(!message.contains("hunter2"), "{query}: {message}");
        }
    }

    #[test]
    fn the_ca_file_is_read_when_connecting_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let connector = |path: &std::path::Path| {
            let url = format!(
                "postgres://u@h/db?sslmode=verify-full&sslrootcert={}",
                path.display()
            );
            tls::connector(&parse_url(&url).unwrap()).map(|_| ())
        };
        let missing = dir.path().join("missing.pem");
        let err = connector(&missing).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "DATABASE_URL: sslrootcert {}: cannot read it",
                missing.display()
            )),
            "{err}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = connector(&empty).unwrap_err().to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = connector(&garbage).unwrap_err().to_string();
        assert!(err.contains("not a usable CA certificate"), "{err}");
    }

    #[test]
    fn every_migration_file_is_listed() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|f| f.ends_with(".sql"))
            .collect();
        files.sort();
        let mut listed: Vec<String> = MIGRATIONS
            .iter()
            .flat_map(|m| match m.sql {
                Sql::Both(_) => vec![format!("{:04}_{}.sql", m.version, m.name)],
                Sql::Flavored { .. } => vec![
                    format!("{:04}_{}.postgres.sql", m.version, m.name),
                    format!("{:04}_{}.timescale.sql", m.version, m.name),
                ],
            })
            .collect();
        listed.sort();
        assert_eq!(files, listed);
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "versions are consecutive");
        }
    }
}
