//! The pipeline configuration: one typed tree, read from TOML, unknown keys rejected.
//!
//! Every key is documented in the README's configuration reference; `weir.example.toml`
//! at the repository root is parsed by a test.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default publication name.
pub const DEFAULT_PUBLICATION: &str = "weir";
/// Default replication slot name.
pub const DEFAULT_SLOT: &str = "weir";
/// Default interval between standby status updates sent to PostgreSQL, in milliseconds.
pub const DEFAULT_STATUS_INTERVAL_MS: u64 = 200;
/// Default connect timeout, in seconds.
pub const DEFAULT_CONNECT_TIMEOUT_S: u64 = 10;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The PostgreSQL database to capture.
    pub source: SourceConfig,
}

/// How TLS is used towards PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, plain otherwise (libpq's default).
    #[default]
    Prefer,
    /// TLS, without checking the certificate.
    Require,
    /// TLS, the certificate signed by a trusted CA.
    VerifyCa,
    /// TLS, the certificate signed by a trusted CA and naming the host.
    VerifyFull,
}

/// The `[source]` table: where and what to capture.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Connection URL, `postgres://user@host:port/database`. A password may be put here
    /// but `password_env` or `password_file` keep it out of the file. Instead of a URL (or
    /// to override its parts), `host`, `port`, `user` and `database` may be given.
    #[serde(default)]
    pub url: String,
    /// Host name, IP address or Unix socket folder (overrides the URL's).
    #[serde(default)]
    pub host: Option<String>,
    /// Port (overrides the URL's; default 5432).
    #[serde(default)]
    pub port: Option<u16>,
    /// Role to connect as (overrides the URL's).
    #[serde(default)]
    pub user: Option<String>,
    /// Database (overrides the URL's).
    #[serde(default)]
    pub database: Option<String>,
    /// Name of an environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Path of a file holding the password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Tables to capture, as `schema.table` (or `table` for `public`).
    pub tables: Vec<String>,
    /// Publication name; created for `tables` when missing.
    #[serde(default = "default_publication")]
    pub publication: String,
    /// Logical replication slot name; created when missing.
    #[serde(default = "default_slot")]
    pub slot: String,
    /// TLS mode: `disable`, `prefer`, `require`, `verify-ca`, `verify-full`.
    #[serde(default)]
    pub tls: TlsMode,
    /// PEM file of the CA that signed the server certificate (else the Mozilla roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Interval between standby status updates (acknowledged position) to PostgreSQL.
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
    /// Seconds to wait for a connection before giving up.
    #[serde(default = "default_connect_timeout_s")]
    pub connect_timeout_s: u64,
}

fn default_publication() -> String {
    DEFAULT_PUBLICATION.to_string()
}
fn default_slot() -> String {
    DEFAULT_SLOT.to_string()
}
fn default_status_interval_ms() -> u64 {
    DEFAULT_STATUS_INTERVAL_MS
}
fn default_connect_timeout_s() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_S
}

impl std::fmt::Debug for SourceConfig {
    // The URL may carry a password: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("url", &redact_url(&self.url))
            .field("tables", &self.tables)
            .field("publication", &self.publication)
            .field("slot", &self.slot)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl SourceConfig {
    /// A source for `url` with every other key at its default.
    pub fn new(url: impl Into<String>, tables: Vec<String>) -> Self {
        SourceConfig {
            url: url.into(),
            host: None,
            port: None,
            user: None,
            database: None,
            password_env: None,
            password_file: None,
            tables,
            publication: default_publication(),
            slot: default_slot(),
            tls: TlsMode::default(),
            ca_file: None,
            status_interval_ms: DEFAULT_STATUS_INTERVAL_MS,
            connect_timeout_s: DEFAULT_CONNECT_TIMEOUT_S,
        }
    }
}

/// The URL with any password replaced by `***`, for messages.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut out = match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_string()
            };
            format!(
                "{}://{}@{}{}",
                &url[..scheme_end],
                masked,
                &authority[at + 1..],
                &rest[authority_end..]
            )
        }
        None => url.to_string(),
    };
    // `?password=...` is also accepted by libpq-style URLs.
    if let Some(q) = out.find("password=") {
        let end = out[q..].find('&').map(|e| q + e).unwrap_or(out.len());
        out.replace_range(q + "password=".len()..end, "***");
    }
    out
}

/// The configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line and key.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks configuration text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let src = &self.source;
        if src.url.is_empty() && (src.host.is_none() || src.user.is_none()) {
            return Err(invalid(
                "source needs a url = \"postgres://user@host:port/database\", or host, user and database".into(),
            ));
        }
        if src.tables.is_empty() {
            return Err(invalid(
                "source.tables is empty: list the tables to capture, e.g. tables = [\"public.users\"]".into(),
            ));
        }
        for name in [&src.publication, &src.slot] {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(invalid(format!(
                    "`{name}` is not a valid publication or slot name: use lower-case letters, digits and underscores"
                )));
            }
        }
        if src.status_interval_ms == 0 {
            return Err(invalid(
                "source.status_interval_ms must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../weir.example.toml");
        let config = Config::load(&path).unwrap();
        assert_eq!(
            config.source.tables,
            ["public.users", "public.transactions"]
        );
        assert_eq!(config.source.slot, "weir");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::parse(
            "[source]\nurl = \"postgres://a@b/c\"\ntables = [\"t\"]\nslott = \"x\"\n",
            Path::new("w.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("slott") && err.contains("w.toml"), "{err}");
    }

    #[test]
    fn bad_values_are_explained() {
        let err = Config::parse(
            "[source]\nurl = \"postgres://a@b/c\"\ntables = []\n",
            Path::new("w.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("source.tables is empty"), "{err}");
        let err = Config::parse(
            "[source]\nurl = \"postgres://a@b/c\"\ntables = [\"t\"]\nslot = \"My-Slot\"\n",
            Path::new("w.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("My-Slot"), "{err}");
    }

    #[test]
    fn fields_instead_of_a_url() {
        let c = Config::parse(
            "[source]\nhost = \"db\"\nport = 6543\nuser = \"weir\"\ndatabase = \"bank\"\ntables = [\"t\"]\n",
            Path::new("w.toml"),
        )
        .unwrap();
        assert_eq!(
            (c.source.host.as_deref(), c.source.port),
            (Some("db"), Some(6543))
        );
        let err = Config::parse("[source]\ntables = [\"t\"]\n", Path::new("w.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a url"), "{err}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://bob:s3cret@db:5432/bank"),
            "postgres://bob:***@db:5432/bank"
        );
        assert_eq!(
            redact_url("postgres://bob@db/bank"),
            "postgres://bob@db/bank"
        );
        assert_eq!(
            redact_url("postgres://db/bank?password=s3cret&x=1"),
            "postgres://db/bank?password=***&x=1"
        );
        let cfg = SourceConfig::new("postgres://bob:s3cret@db/bank", vec!["t".into()]);
        assert!(!format!("{cfg:?}").contains("s3cret"));
    }
}
