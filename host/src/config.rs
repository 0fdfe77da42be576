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
/// Default `source.receive_timeout_s`.
pub const DEFAULT_RECEIVE_TIMEOUT_S: u64 = 30;
/// Default `source.backfill_connections`.
pub const DEFAULT_BACKFILL_CONNECTIONS: usize = 1;

/// Default lake location: a folder next to where weir runs.
pub const DEFAULT_LAKE_URL: &str = "./lake";
/// Default update delay: commit as soon as possible.
pub const DEFAULT_UPDATE_DELAY: &str = "0s";
/// Default row limit of one Delta commit.
pub const DEFAULT_MAX_BATCH_ROWS: usize = 20_000;
/// Default size limit of one Delta commit (JSON bytes of its changes).
pub const DEFAULT_MAX_BATCH_BYTES: usize = 64 << 20;
/// Changes per part of the backfill or of a large transaction: about 7 KB of memory
/// each while in flight (three parts at most: gathering, queued, being written).
pub const DEFAULT_PART_ROWS: usize = 2_500;
/// Default number of commits between two Delta log checkpoints.
pub const DEFAULT_CHECKPOINT_INTERVAL: u64 = 100;
/// Default catalog name under which `weir query` shows the lake's tables.
pub const DEFAULT_CATALOG: &str = "weir";
/// Default schema name under which `weir query` shows the lake's tables.
pub const DEFAULT_SCHEMA: &str = "default";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The PostgreSQL database to capture.
    pub source: SourceConfig,
    /// Where and how changes land in Delta Lake.
    #[serde(default)]
    pub lake: LakeConfig,
    /// WebAssembly plugins every change goes through, in order.
    #[serde(default)]
    pub plugins: Vec<PluginConfig>,
    /// The web dashboard and `/metrics`; `weir run` serves them when this table is present.
    #[serde(default)]
    pub dashboard: Option<DashboardConfig>,
}

/// Default address of the dashboard: this machine only.
pub const DEFAULT_DASHBOARD_LISTEN: &str = "127.0.0.1:8080";

/// `[dashboard]`: the web page and `/metrics`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardConfig {
    /// Address and port to listen on.
    #[serde(default = "default_dashboard_listen")]
    pub listen: String,
    /// Name of an environment variable holding an access token; when set, every request
    /// needs it (`Authorization: Bearer <token>` or `?token=<token>`).
    #[serde(default)]
    pub token_env: Option<String>,
    /// Path of a file holding the access token (trailing newline ignored).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The lake table of transactions the fraud view plots.
    #[serde(default = "default_transactions_table")]
    pub transactions: String,
    /// The lake table of users (names in the user picker).
    #[serde(default = "default_users_table")]
    pub users: String,
    /// The lake table of the fraud rule's alerts.
    #[serde(default = "default_alerts_table")]
    pub alerts: String,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        DashboardConfig {
            listen: default_dashboard_listen(),
            token_env: None,
            token_file: None,
            transactions: default_transactions_table(),
            users: default_users_table(),
            alerts: default_alerts_table(),
        }
    }
}

impl DashboardConfig {
    /// The access token, if one is configured.
    pub fn token(&self) -> Result<Option<String>, String> {
        if let Some(var) = &self.token_env {
            return std::env::var(var).map(Some).map_err(|_| {
                format!("dashboard token: environment variable `{var}` (token_env) is not set")
            });
        }
        if let Some(path) = &self.token_file {
            return std::fs::read_to_string(path)
                .map(|t| Some(t.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|e| {
                    format!(
                        "dashboard token: reading {} (token_file): {e}",
                        path.display()
                    )
                });
        }
        Ok(None)
    }
}

fn default_dashboard_listen() -> String {
    DEFAULT_DASHBOARD_LISTEN.into()
}
fn default_transactions_table() -> String {
    "transactions".into()
}
fn default_users_table() -> String {
    "users".into()
}
fn default_alerts_table() -> String {
    "fraud_alerts".into()
}

/// `[[plugins]]`: one WebAssembly component in the pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The component (`.wasm`).
    pub path: PathBuf,
    /// Its name in dead letters and state (default: the file name without `.wasm`).
    #[serde(default)]
    pub name: Option<String>,
    /// Handed to the plugin's `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
    /// CPU time, memory and output limits.
    #[serde(default)]
    pub limits: crate::plugin::Limits,
}

impl PluginConfig {
    /// The plugin's name.
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "plugin".into())
        })
    }
}

/// How a replica applies a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DeleteMode {
    /// The row is removed from the replica.
    #[default]
    Hard,
    /// The row stays, with `_deleted = true`.
    Soft,
}

/// The `[lake]` table: the Delta tables changes land in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeConfig {
    /// Folder or object-store URL holding one Delta table per sub-folder.
    #[serde(default = "default_lake_url")]
    pub url: String,
    /// Names this pipeline in the Delta tables' application transactions (default: the
    /// slot name). Two pipelines writing one lake need different names.
    #[serde(default)]
    pub pipeline: Option<String>,
    /// How long changes may wait before they are committed (`"0s"`, `"250ms"`, `"1s"`,
    /// `"1m"`): longer means fewer, larger Delta commits.
    #[serde(default = "default_update_delay")]
    pub update_delay: String,
    /// A commit closes (at a transaction boundary) once it holds this many changes.
    #[serde(default = "default_max_batch_rows")]
    pub max_batch_rows: usize,
    /// A commit closes (at a transaction boundary) once its changes are this large (bytes).
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// The backfill, and a source transaction with more changes than this, are committed
    /// in parts of this many changes (what weir holds in memory for them).
    #[serde(default = "default_part_rows")]
    pub part_rows: usize,
    /// Delete mode of every replica unless a table says otherwise.
    #[serde(default)]
    pub delete: DeleteMode,
    /// Whether every source table also gets a change log, unless a table says otherwise.
    #[serde(default)]
    pub change_log: bool,
    /// Commits between two checkpoints of a Delta table's log.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: u64,
    /// A table with this many files smaller than `compact_target_mb` is compacted by the
    /// pipeline between two writes (0: never; `weir lake optimize` still does).
    #[serde(default = "default_compact_files")]
    pub compact_files: usize,
    /// The size of the files compaction writes (MiB).
    #[serde(default = "default_compact_target_mb")]
    pub compact_target_mb: u64,
    /// Catalog name for `weir query` (``SELECT * FROM `catalog`.`schema`.`table` ``).
    #[serde(default = "default_catalog")]
    pub catalog: String,
    /// Schema name for `weir query`.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Per source table (`schema.table`) settings.
    #[serde(default)]
    pub tables: std::collections::BTreeMap<String, LakeTableConfig>,
    /// Object-store options (`endpoint`, `region`, `allow_http`, ...) for `s3://`,
    /// `gs://` and `az://` lakes; credentials are best left to the stores' standard
    /// environment variables.
    #[serde(default)]
    pub storage: StorageOptions,
}

/// `[lake.storage]`: object-store options as the deltalake crate names them. They may
/// hold credentials, so only their names are ever shown.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct StorageOptions(pub std::collections::BTreeMap<String, String>);

impl std::fmt::Debug for StorageOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

/// `[lake.tables."schema.table"]`: one source table's Delta tables.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeTableConfig {
    /// Name of the replica's folder and query name (default: the table name, prefixed
    /// with `schema_` outside `public`).
    #[serde(default)]
    pub name: Option<String>,
    /// Delete mode of this replica.
    #[serde(default)]
    pub delete: Option<DeleteMode>,
    /// Whether this table gets a change log (`<name>_changes`).
    #[serde(default)]
    pub change_log: Option<bool>,
}

impl Default for LakeConfig {
    fn default() -> Self {
        LakeConfig {
            url: default_lake_url(),
            pipeline: None,
            update_delay: default_update_delay(),
            max_batch_rows: DEFAULT_MAX_BATCH_ROWS,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            part_rows: DEFAULT_PART_ROWS,
            delete: DeleteMode::Hard,
            change_log: false,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            compact_files: default_compact_files(),
            compact_target_mb: default_compact_target_mb(),
            catalog: default_catalog(),
            schema: default_schema(),
            tables: Default::default(),
            storage: Default::default(),
        }
    }
}

impl LakeConfig {
    /// The update delay as a duration.
    pub fn update_delay(&self) -> Result<std::time::Duration, String> {
        parse_duration(&self.update_delay)
    }
}

/// Parses `"0"`, `"250ms"`, `"1s"`, `"1.5s"`, `"2m"`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&t[..i], t[i..].trim()),
        None => (t, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: write e.g. \"0s\", \"250ms\", \"1s\""))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        _ => {
            return Err(format!(
                "`{text}` has an unknown unit `{unit}`: use ms, s or m"
            ));
        }
    };
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn default_lake_url() -> String {
    DEFAULT_LAKE_URL.into()
}
fn default_update_delay() -> String {
    DEFAULT_UPDATE_DELAY.into()
}
fn default_max_batch_rows() -> usize {
    DEFAULT_MAX_BATCH_ROWS
}
fn default_max_batch_bytes() -> usize {
    DEFAULT_MAX_BATCH_BYTES
}
fn default_part_rows() -> usize {
    DEFAULT_PART_ROWS
}
fn default_compact_files() -> usize {
    64
}

fn default_compact_target_mb() -> u64 {
    16
}

fn default_checkpoint_interval() -> u64 {
    DEFAULT_CHECKPOINT_INTERVAL
}
fn default_catalog() -> String {
    DEFAULT_CATALOG.into()
}
fn default_schema() -> String {
    DEFAULT_SCHEMA.into()
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
    /// Seconds the replication connection may stay silent before weir checks, over
    /// another connection, that the server still hears it; a connection the server no
    /// longer hears (a network cut) is re-established. 0 turns the check off.
    #[serde(default = "default_receive_timeout_s")]
    pub receive_timeout_s: u64,
    /// Connections that copy one large table at once during a backfill, each a range of
    /// its blocks, all at the backfill's snapshot (1: one COPY per table).
    #[serde(default = "default_backfill_connections")]
    pub backfill_connections: usize,
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
fn default_receive_timeout_s() -> u64 {
    DEFAULT_RECEIVE_TIMEOUT_S
}
fn default_backfill_connections() -> usize {
    DEFAULT_BACKFILL_CONNECTIONS
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
            receive_timeout_s: DEFAULT_RECEIVE_TIMEOUT_S,
            backfill_connections: DEFAULT_BACKFILL_CONNECTIONS,
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
        let lake = &self.lake;
        lake.update_delay()
            .map_err(|e| invalid(format!("lake.update_delay: {e}")))?;
        if lake.max_batch_rows == 0
            || lake.max_batch_bytes == 0
            || lake.part_rows == 0
            || lake.checkpoint_interval == 0
        {
            return Err(invalid(
                "lake.max_batch_rows, lake.max_batch_bytes, lake.part_rows and lake.checkpoint_interval must be at least 1".into(),
            ));
        }
        for table in lake.tables.keys() {
            let known = src.tables.iter().any(|t| {
                t == table
                    || (!t.contains('.') && format!("public.{t}") == *table)
                    || crate::relation::TableInfo::offline(t, 0).display() == *table
            });
            if !known {
                return Err(invalid(format!(
                    "[lake.tables.\"{table}\"] names a table that is not in source.tables; write it as `schema.table`"
                )));
            }
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
        assert_eq!(config.lake.url, "./lake");
        assert_eq!(
            config.lake.update_delay().unwrap(),
            std::time::Duration::ZERO
        );
        let t = &config.lake.tables["public.transactions"];
        assert_eq!(t.delete, Some(DeleteMode::Soft));
        assert_eq!(t.change_log, Some(true));
        assert_eq!(config.plugins.len(), 1);
        assert_eq!(config.plugins[0].name(), "fraud_rule");
        assert_eq!(config.plugins[0].limits.memory_mb, 64);
        assert_eq!(
            serde_json::to_value(&config.plugins[0].config).unwrap(),
            serde_json::json!({"multiplier": 3.0, "emit": "anomalies"})
        );
        let dash = config.dashboard.unwrap();
        assert_eq!(dash.listen, DEFAULT_DASHBOARD_LISTEN);
        assert_eq!(dash.alerts, "fraud_alerts");
    }

    #[test]
    fn the_compose_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/weir.toml");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.lake.url, "/data/lake");
        assert_eq!(
            config.plugins[0].path,
            Path::new("/plugins/fraud_rule.wasm")
        );
        assert_eq!(config.dashboard.unwrap().listen, "0.0.0.0:8080");
    }

    #[test]
    fn storage_options_show_only_their_names() {
        let lake: LakeConfig = toml::from_str(
            "url = \"s3://b/p\"\n[storage]\naws_secret_access_key = \"very-secret\"\n",
        )
        .unwrap();
        let shown = format!("{lake:?}");
        assert!(
            shown.contains("aws_secret_access_key") && !shown.contains("very-secret"),
            "{shown}"
        );
    }

    #[test]
    fn durations_and_lake_keys_are_checked() {
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert_eq!(parse_duration("1.5s").unwrap().as_millis(), 1500);
        assert_eq!(parse_duration("2m").unwrap().as_secs(), 120);
        assert!(parse_duration("soon").is_err());
        let base = "[source]\nurl = \"postgres://a@b/c\"\ntables = [\"public.t\"]\n";
        let err = Config::parse(
            &format!("{base}[lake]\nupdate_delay = \"1h\"\n"),
            Path::new("w.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("lake.update_delay") && err.contains("unknown unit"),
            "{err}"
        );
        let err = Config::parse(
            &format!("{base}[lake.tables.\"public.other\"]\ndelete = \"soft\"\n"),
            Path::new("w.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("public.other") && err.contains("not in source.tables"),
            "{err}"
        );
        let err = Config::parse(
            &format!("{base}[lake]\ndelete = \"maybe\"\n"),
            Path::new("w.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("maybe"), "{err}");
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
