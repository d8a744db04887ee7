//! [`TestDb`]: a throwaway database on a real PostgreSQL server.

use std::sync::Arc;

const DEFAULT_ADMIN_URL: &str = "postgres://root@127.0.0.1:5432/postgres";

/// A new, empty database `dataviz_test_<uuid v7>` on the server of `DATAVIZ_TEST_DATABASE_URL`
/// (default `postgres://root@127.0.0.1:5432/postgres`). Dropping it drops the database, closing
/// any connection still open to it. Run the migrations yourself (`dataviz_core::db::migrate`).
///
/// The fixture's own connections follow the URL's `sslmode` as tokio-postgres reads it
/// (`disable`, `prefer`, the default: TLS when the server offers it, `require`) and check no
/// certificate: they only ever talk to test servers. [`url`](Self::url) keeps the admin URL's
/// query, so a server that takes TLS only is reached with `?sslmode=require`.
pub struct TestDb {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDb {
    /// Creates the database. Panics, naming the URL, if the server cannot be reached.
    pub async fn create() -> Self {
        let admin_url = std::env::var("DATAVIZ_TEST_DATABASE_URL")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_owned());
        Self::create_on(admin_url).await
    }

    /// Creates the database on the server of `admin_url` (a superuser URL).
    pub async fn create_on(admin_url: String) -> Self {
        // v7: names sort by creation time, which helps when cleaning up after killed test runs.
        let name = format!("dataviz_test_{}", uuid::Uuid::now_v7().simple());
        let client = connect(&admin_url).await.unwrap_or_else(|e| {
            panic!(
                "cannot connect to PostgreSQL at {admin_url} ({e}): run scripts/setup, or set \
                 DATAVIZ_TEST_DATABASE_URL to a superuser URL"
            )
        });
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} on {admin_url}: {e}"));
        let url = with_dbname(&admin_url, &name);
        Self {
            admin_url,
            name,
            url,
        }
    }

    /// The URL of the new database (the admin URL with the database name replaced).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection to the new database, its driver task spawned on the current runtime.
    pub async fn connect(&self) -> tokio_postgres::Client {
        connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop may run inside a tokio runtime, where blocking on another future is not allowed:
        // do it on a thread of our own with a runtime of its own.
        let result = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let client = connect(&admin_url).await.map_err(|e| e.to_string())?;
                client.batch_execute(&sql).await.map_err(|e| e.to_string())
            })
        })
        .join();
        // Never panic in drop (it would abort a test that is already unwinding): say it instead.
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!(
                "dataviz-testkit: could not drop database {}: {e}",
                self.name
            ),
            Err(_) => eprintln!("dataviz-testkit: dropping database {} panicked", self.name),
        }
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, any_certificate()).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// TLS that accepts any server certificate (the handshake signature is still checked), with
/// ring named as the provider so that no process default is needed. The product's connections
/// verify certificates as `sslmode` says (`dataviz_core::db`); this crate depends on none of the
/// project's crates, so it has its own few lines.
fn any_certificate() -> tokio_postgres_rustls::MakeRustlsConnect {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Replaces the database name in a `postgres://user@host:port/dbname?params` URL.
fn with_dbname(url: &str, dbname: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let (base, rest) = match url[authority_start..].find(['/', '?']) {
        Some(i) => url.split_at(authority_start + i),
        None => (url, ""),
    };
    let query = rest.find('?').map_or("", |i| &rest[i..]);
    format!("{base}/{dbname}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_name() {
        let cases = [
            (
                "postgres://root@127.0.0.1:5432/postgres",
                "postgres://root@127.0.0.1:5432/x",
            ),
            (
                "postgres://u:p@h/postgres?sslmode=disable",
                "postgres://u:p@h/x?sslmode=disable",
            ),
            ("postgresql://h:5432", "postgresql://h:5432/x"),
            (
                "postgres://h?application_name=a",
                "postgres://h/x?application_name=a",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(with_dbname(url, "x"), expected, "{url}");
        }
    }

    #[tokio::test]
    async fn creates_and_drops_a_database() {
        let db = TestDb::create().await;
        assert!(db.name().starts_with("dataviz_test_"));
        assert!(db.url().ends_with(db.name()));

        let client = db.connect().await;
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
        let current: String = client
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(current, db.name());

        // Dropped even with a connection still open to it (WITH (FORCE)), from within a runtime.
        let (admin_url, name) = (db.admin_url.clone(), db.name().to_owned());
        drop(db);
        let admin = connect(&admin_url).await.unwrap();
        let left = admin
            .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await
            .unwrap();
        assert!(left.is_empty(), "{name} still exists");
        drop(client);
    }
}
