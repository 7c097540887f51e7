//! TLS for both servers with one crypto stack: rustls with the ring provider, the system's
//! root certificates plus an optional CA file (e.g. the one Supabase offers for download).
//!
//! PostgreSQL, as libpq decides: `prefer` (also when the URL names no `sslmode`) tries TLS
//! first and falls back to plain text when the server declines it or the handshake fails;
//! `allow` tries plain text first and TLS if that fails; `disable` never uses TLS; `require`,
//! `verify-ca` and `verify-full` use TLS or fail. TLS always verifies the certificate chain and
//! host name (rustls has no unverified mode, and we add none), so with `prefer` a certificate
//! that does not verify means plain text, said in the log. `sslrootcert=FILE` in the URL names a
//! CA file. A Unix socket is never encrypted (as with libpq). Redis: `rediss://` URLs, with the
//! same optional CA file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read the CA file {path}: {detail}")]
    CaFile { path: String, detail: String },
    #[error("no usable root certificates (system store empty and no CA file given)")]
    NoRoots,
    #[error("tls setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Makes ring the process-wide rustls provider (idempotent). Libraries that build their own
/// rustls configuration (redis) use the process default; ring is the only provider compiled
/// in, and installing it explicitly keeps that choice if a dependency ever enables another
/// (rustls then refuses to pick one).
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The certificates in PEM file `path`.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |detail: String| TlsError::CaFile {
        path: path.display().to_string(),
        detail,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| error(e.to_string()))?;
    if certs.is_empty() {
        return Err(error("no certificate in it".to_string()));
    }
    Ok(certs)
}

/// A client configuration trusting the system roots and `ca_file`.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A broken certificate in the system store is not our concern; skip it.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        for cert in read_ca_file(path)? {
            roots.add(cert)?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// What a PostgreSQL URL's `sslmode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgTlsMode {
    Disable,
    Allow,
    Prefer,
    /// `require`, `verify-ca`, `verify-full`: all verify (see the module's header).
    Require,
}

/// One way of connecting, tried in the order [`PgTlsMode::attempts`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Plain,
    /// TLS, or no connection.
    Tls,
    /// TLS if the server offers it, plain text on the same connection if it declines.
    TlsIfOffered,
}

impl PgTlsMode {
    /// The attempts this mode makes, in order; the next one runs only if the previous failed.
    pub fn attempts(self) -> &'static [Attempt] {
        match self {
            PgTlsMode::Disable => &[Attempt::Plain],
            PgTlsMode::Allow => &[Attempt::Plain, Attempt::Tls],
            PgTlsMode::Prefer => &[Attempt::TlsIfOffered, Attempt::Plain],
            PgTlsMode::Require => &[Attempt::Tls],
        }
    }
}

/// How a PostgreSQL URL asks for TLS, with `sslmode` and `sslrootcert` taken out of the URL
/// (tokio-postgres' parser knows neither `verify-*` nor `sslrootcert`; the mode is applied
/// per attempt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTls {
    pub url: String,
    pub mode: PgTlsMode,
    pub ca_file: Option<PathBuf>,
}

pub fn pg_tls(url: &str) -> PgTls {
    let mut mode = PgTlsMode::Prefer;
    let mut ca_file = None;
    let mut take = |key: &str, value: &str| -> bool {
        match key {
            "sslmode" => {
                mode = match value {
                    "disable" => PgTlsMode::Disable,
                    "allow" => PgTlsMode::Allow,
                    "require" | "verify-ca" | "verify-full" => PgTlsMode::Require,
                    _ => PgTlsMode::Prefer,
                };
                true
            }
            "sslrootcert" => {
                ca_file = Some(PathBuf::from(value));
                true
            }
            _ => false,
        }
    };
    let url = if url.contains("://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let params: Vec<&str> = query
                    .split('&')
                    .filter(|pair| {
                        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                        !take(key, value)
                    })
                    .collect();
                if params.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", params.join("&"))
                }
            }
        }
    } else {
        url.split_whitespace()
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                !take(key, value)
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    PgTls { url, mode, ca_file }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmodes_follow_libpq() {
        let p =
            pg_tls("postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x");
        assert_eq!(p.url, "postgres://u@h/db?application_name=x");
        assert_eq!(p.mode, PgTlsMode::Require);
        assert_eq!(p.ca_file, Some(PathBuf::from("/ca.pem")));
        let p = pg_tls("postgres://u@h/db?sslmode=prefer");
        assert_eq!(p.url, "postgres://u@h/db");
        assert_eq!(p.mode, PgTlsMode::Prefer);
        // No sslmode: libpq's default, prefer.
        let p = pg_tls("postgres://u@h/db");
        assert_eq!(p.url, "postgres://u@h/db");
        assert_eq!(p.mode, PgTlsMode::Prefer);
        assert_eq!(pg_tls("host=h sslmode=allow").mode, PgTlsMode::Allow);
        assert_eq!(pg_tls("host=h sslmode=allow").url, "host=h");
        assert_eq!(
            pg_tls("postgres://h/db?sslmode=disable").mode,
            PgTlsMode::Disable
        );
        assert_eq!(
            PgTlsMode::Prefer.attempts(),
            &[Attempt::TlsIfOffered, Attempt::Plain]
        );
        assert_eq!(PgTlsMode::Require.attempts(), &[Attempt::Tls]);
    }
}
