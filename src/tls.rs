//! TLS for both servers with one crypto stack: rustls with the ring provider, the system's
//! root certificates plus an optional CA file (e.g. the one Supabase offers for download).
//!
//! PostgreSQL: `sslmode=require`, `verify-ca` and `verify-full` connect over TLS and always
//! verify the certificate chain and host name (rustls has no unverified mode, and we add none);
//! `sslrootcert=FILE` in the URL names a CA file. `disable`, `allow` and `prefer` connect in
//! plain text. Redis: `rediss://` URLs, with the same optional CA file.

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

/// How a PostgreSQL URL asks for TLS, with the URL rewritten for tokio-postgres (whose parser
/// knows neither `verify-*` nor `sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTls {
    pub url: String,
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
}

pub fn pg_tls(url: &str) -> PgTls {
    let mut tls = false;
    let mut ca_file = None;
    let mut rewrite = |key: &str, value: &str| -> Option<String> {
        match key {
            "sslmode" => match value {
                "require" | "verify-ca" | "verify-full" => {
                    tls = true;
                    Some("require".to_string())
                }
                _ => Some("disable".to_string()),
            },
            "sslrootcert" => {
                ca_file = Some(PathBuf::from(value));
                None
            }
            _ => Some(value.to_string()),
        }
    };
    let url = if url.contains("://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let params: Vec<String> = query
                    .split('&')
                    .filter_map(|pair| {
                        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                        rewrite(key, value).map(|v| format!("{key}={v}"))
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
            .filter_map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                rewrite(key, value).map(|v| format!("{key}={v}"))
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    PgTls { url, tls, ca_file }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmodes_map_to_what_tokio_postgres_parses() {
        let p =
            pg_tls("postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x");
        assert_eq!(
            p.url,
            "postgres://u@h/db?sslmode=require&application_name=x"
        );
        assert!(p.tls);
        assert_eq!(p.ca_file, Some(PathBuf::from("/ca.pem")));
        let p = pg_tls("postgres://u@h/db?sslmode=prefer");
        assert_eq!(p.url, "postgres://u@h/db?sslmode=disable");
        assert!(!p.tls);
        let p = pg_tls("postgres://u@h/db");
        assert_eq!(p.url, "postgres://u@h/db");
        assert!(!p.tls);
        let p = pg_tls("host=h sslmode=require sslrootcert=/c.pem");
        assert_eq!(p.url, "host=h sslmode=require");
        assert!(p.tls);
    }
}
