//! The TLS side of a PostgreSQL connection: one rustls configuration per [`DatabaseUrl`], which
//! decides how the server's certificate is checked.
//!
//! | `sslmode` | encrypted | certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` | when the server offers TLS | only with `sslrootcert`: signed by it |
//! | `require` | always | only with `sslrootcert`: signed by it (libpq's verify-ca) |
//! | `verify-ca` | always | signed by `sslrootcert` |
//! | `verify-full` | always | signed by `sslrootcert` (else the system's CAs), for the host name |
//!
//! Without `sslrootcert`, `prefer` and `require` encrypt but accept any certificate, as libpq
//! does: they keep out eavesdroppers, not an active man in the middle.
//!
//! The crypto provider is ring's, named here rather than taken from the process default, so a
//! connection works in any program or test (the binary installs the same provider at start).

use super::{DatabaseUrl, DatabaseUrlError, RootCerts, SslMode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::Arc;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The TLS connector for `url`'s `sslmode` and `sslrootcert`. Reads the CA file (or the system's
/// CA certificates) now, once.
pub fn connector(url: &DatabaseUrl) -> Result<MakeRustlsConnect, DatabaseUrlError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions");
    let roots = match (&url.root_certs, url.ssl_mode) {
        (Some(RootCerts::File(path)), _) => Some(roots_from_file(path)?),
        (Some(RootCerts::System), _) | (None, SslMode::VerifyFull) => Some(system_roots()?),
        (None, _) => None,
    };
    let mut config = match (url.ssl_mode, roots) {
        (SslMode::VerifyFull, Some(roots)) => {
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        // Under `disable` no TLS is ever started: this configuration goes unused.
        (_, roots) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoNameCheck {
                roots: roots.map(Arc::new),
                provider,
            }))
            .with_no_client_auth(),
    };
    // What libpq 17 sends; PostgreSQL 17 requires it with `sslnegotiation=direct`.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(MakeRustlsConnect::new(config))
}

fn roots_from_file(path: &Path) -> Result<RootCertStore, DatabaseUrlError> {
    let bad = |reason: String| DatabaseUrlError::RootCert {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("it holds no PEM certificate".to_owned()));
    }
    Ok(roots)
}

/// The operating system's CA certificates (`/etc/ssl/certs` on Debian, from `ca-certificates`):
/// the store NATS and MQTT connections use too, and one an operator can add a private CA to,
/// unlike a list compiled into the binary.
fn system_roots() -> Result<RootCertStore, DatabaseUrlError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(DatabaseUrlError::NoSystemRoots(errors.join("; ")));
    }
    Ok(roots)
}

/// Every mode but `verify-full`: with `roots` (`verify-ca`, and `prefer`/`require` with
/// `sslrootcert`), the certificate must chain up to one of them and be valid now; the name it was
/// issued for is not checked. Without (`prefer`/`require` alone, libpq's behaviour), any
/// certificate is accepted. Either way the handshake signature is checked, so the server holds
/// the key of the certificate it showed.
#[derive(Debug)]
struct NoNameCheck {
    roots: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoNameCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
