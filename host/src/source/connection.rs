//! Connecting to PostgreSQL: settings from the config, the password from where the user
//! keeps it, TLS with rustls, and the two kinds of session (SQL and replication).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{ReplicationConfig, SslMode as ReplSslMode, TlsConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::Host;

use super::error::SourceError;
use crate::config::{SourceConfig, TlsMode};
use crate::decode::value::SESSION_OPTIONS;

/// Everything needed to open sessions to the source database. Its `Debug` hides the
/// password.
#[derive(Clone)]
pub struct ConnectionSettings {
    /// Host name, IP address or Unix socket directory.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Role.
    pub user: String,
    password: String,
    /// Database.
    pub database: String,
    /// TLS mode.
    pub tls: TlsMode,
    /// CA certificate file for verify modes.
    pub ca_file: Option<PathBuf>,
    /// Connect timeout.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for ConnectionSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionSettings")
            .field("target", &self.target())
            .field("user", &self.user)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl ConnectionSettings {
    /// Reads the settings of `[source]`, resolving the password.
    pub fn from_config(cfg: &SourceConfig) -> Result<Self, SourceError> {
        let parsed: tokio_postgres::Config = if cfg.url.is_empty() {
            tokio_postgres::Config::new()
        } else {
            cfg.url.parse().map_err(|e| {
                SourceError::Settings(format!(
                    "source.url `{}` is not a PostgreSQL URL ({e}); expected postgres://user@host:port/database",
                    crate::config::redact_url(&cfg.url)
                ))
            })?
        };
        let host = match (&cfg.host, parsed.get_hosts()) {
            (Some(h), _) => h.clone(),
            (None, []) => "localhost".to_string(),
            (None, [Host::Tcp(h)]) => h.clone(),
            (None, [Host::Unix(p)]) => p.display().to_string(),
            (None, _) => {
                return Err(SourceError::Settings(
                    "source.url names several hosts; give one".into(),
                ));
            }
        };
        let port = cfg
            .port
            .or(parsed.get_ports().first().copied())
            .unwrap_or(5432);
        let user = cfg
            .user
            .clone()
            .or(parsed.get_user().map(str::to_string))
            .ok_or_else(|| {
                SourceError::Settings(
                    "no user: write postgres://user@host/db or set source.user".into(),
                )
            })?;
        let database = cfg
            .database
            .clone()
            .or(parsed.get_dbname().map(str::to_string))
            .unwrap_or_else(|| user.clone());
        let password = resolve_password(cfg, parsed.get_password())?;
        Ok(ConnectionSettings {
            host,
            port,
            user,
            password,
            database,
            tls: cfg.tls,
            ca_file: cfg.ca_file.clone(),
            connect_timeout: Duration::from_secs(cfg.connect_timeout_s.max(1)),
        })
    }

    /// `host:port/database`, for messages.
    pub fn target(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.database)
    }

    fn pg_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        if self.host.starts_with('/') {
            c.host_path(&self.host);
        } else {
            c.host(&self.host);
        }
        c.port(self.port)
            .user(&self.user)
            .password(&self.password)
            .dbname(&self.database)
            .options(SESSION_OPTIONS)
            .application_name("weir")
            .connect_timeout(self.connect_timeout)
            // A peer gone without a word (a network cut) is noticed within about a
            // minute, not after the kernel's two hours of silence or fifteen of resends.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(60))
            .ssl_mode(match self.tls {
                TlsMode::Disable => tokio_postgres::config::SslMode::Disable,
                TlsMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                _ => tokio_postgres::config::SslMode::Require,
            });
        c
    }

    /// Opens a SQL session; its connection task runs in the background.
    pub async fn connect_sql(&self) -> Result<tokio_postgres::Client, SourceError> {
        let config = self.pg_config();
        let connected = if self.tls == TlsMode::Disable {
            tokio::time::timeout(self.connect_timeout, config.connect(tokio_postgres::NoTls))
                .await
                .map(|r| r.map(|(client, conn)| spawn_connection(client, conn)))
        } else {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.rustls_config()?);
            tokio::time::timeout(self.connect_timeout, config.connect(tls))
                .await
                .map(|r| r.map(|(client, conn)| spawn_connection(client, conn)))
        };
        match connected {
            Err(_) => Err(SourceError::Unreachable {
                target: self.target(),
                reason: format!("no answer within {:?}", self.connect_timeout),
            }),
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(self.classify(e)),
        }
    }

    /// Turns a connection error into the error a user can act on.
    fn classify(&self, e: tokio_postgres::Error) -> SourceError {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            if code.starts_with("28") {
                return SourceError::Authentication {
                    user: self.user.clone(),
                    target: self.target(),
                    reason: db.message().to_string(),
                };
            }
            if code == "3D000" {
                return SourceError::Settings(format!(
                    "database `{}` does not exist at {}:{}",
                    self.database, self.host, self.port
                ));
            }
            return SourceError::Query {
                context: format!("connecting to {}", self.target()),
                source: e,
            };
        }
        let reason = super::error::db_message(&e);
        if reason.contains("password")
            || reason.contains("SASL")
            || reason.contains("authentication")
        {
            return SourceError::Authentication {
                user: self.user.clone(),
                target: self.target(),
                reason,
            };
        }
        SourceError::Unreachable {
            target: self.target(),
            reason,
        }
    }

    /// The replication session's settings.
    pub fn replication_config(&self, slot: &str, publications: Vec<String>) -> ReplicationConfig {
        let mut c = ReplicationConfig::new(
            self.host.clone(),
            self.user.clone(),
            self.password.clone(),
            self.database.clone(),
            slot.to_string(),
            publications,
        )
        .with_port(self.port);
        c.tls = TlsConfig {
            mode: match self.tls {
                TlsMode::Disable => ReplSslMode::Disable,
                TlsMode::Prefer => ReplSslMode::Prefer,
                TlsMode::Require => ReplSslMode::Require,
                TlsMode::VerifyCa => ReplSslMode::VerifyCa,
                TlsMode::VerifyFull => ReplSslMode::VerifyFull,
            },
            ca_pem_path: self.ca_file.clone(),
            ..TlsConfig::default()
        };
        c.options = Some(SESSION_OPTIONS.to_string());
        c.application_name = Some("weir".to_string());
        c
    }

    fn rustls_config(&self) -> Result<rustls::ClientConfig, SourceError> {
        install_crypto_provider();
        let builder = rustls::ClientConfig::builder();
        let config = match self.tls {
            TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate))
                .with_no_client_auth(),
            TlsMode::VerifyCa | TlsMode::VerifyFull => {
                let mut roots = rustls::RootCertStore::empty();
                match &self.ca_file {
                    Some(path) => {
                        let certs = CertificateDer::pem_file_iter(path)
                            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                            .map_err(|e| {
                                SourceError::Settings(format!(
                                    "cannot read source.ca_file {}: {e}",
                                    path.display()
                                ))
                            })?;
                        for cert in certs {
                            roots.add(cert).map_err(|e| {
                                SourceError::Settings(format!(
                                    "source.ca_file {}: {e}",
                                    path.display()
                                ))
                            })?;
                        }
                    }
                    None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
                }
                let roots = Arc::new(roots);
                if self.tls == TlsMode::VerifyFull {
                    builder.with_root_certificates(roots).with_no_client_auth()
                } else {
                    let inner = rustls::client::WebPkiServerVerifier::builder(roots)
                        .build()
                        .map_err(|e| SourceError::Settings(format!("TLS roots: {e}")))?;
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(IgnoreHostname(inner)))
                        .with_no_client_auth()
                }
            }
        };
        Ok(config)
    }
}

fn spawn_connection<S, T>(
    client: tokio_postgres::Client,
    conn: tokio_postgres::Connection<S, T>,
) -> tokio_postgres::Client
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "SQL connection ended");
        }
    });
    client
}

/// Installs ring as rustls' crypto provider for the process (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn resolve_password(cfg: &SourceConfig, in_url: Option<&[u8]>) -> Result<String, SourceError> {
    if let Some(var) = &cfg.password_env {
        return std::env::var(var).map_err(|_| {
            SourceError::Password(format!(
                "source.password_env names `{var}`, which is not set"
            ))
        });
    }
    if let Some(path) = &cfg.password_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            SourceError::Password(format!("source.password_file {}: {e}", path.display()))
        })?;
        return Ok(text.trim_end_matches(['\n', '\r']).to_string());
    }
    if let Some(p) = in_url {
        return String::from_utf8(p.to_vec())
            .map_err(|_| SourceError::Password("the password in source.url is not UTF-8".into()));
    }
    Ok(std::env::var("PGPASSWORD").unwrap_or_default())
}

/// `require` mode: encrypt, but trust any certificate (as libpq does).
#[derive(Debug)]
struct AcceptAnyCertificate;

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `verify-ca` mode: the chain must lead to a trusted root; the name is not checked.
#[derive(Debug)]
struct IgnoreHostname(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreHostname {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
