//! The dashboard: a web page over the lake and `/metrics`.
//!
//! - `/`: the fraud view (a user's transactions over time, the fraud rule's anomalies in
//!   red, the latest alerts) and the pipeline view (position, lag, rates, plugin failures,
//!   dead letters, tables). The page, its script and style are embedded in the binary.
//! - `/api/users`, `/api/users/{id}/chart`, `/api/alerts`, `/api/pipeline`: JSON the page
//!   polls; the chart comes as SVG rendered here ([`chart`]).
//! - `/metrics`: the running pipeline's figures in Prometheus' text format.
//!
//! Every request reads the lake afresh, so the page follows the pipeline's commits. A
//! request that fails (empty lake, missing table, unknown user) answers with a JSON
//! `{"error": ...}` the page shows as it is; nothing a request does stops the server.

pub mod chart;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::config::DashboardConfig;
use crate::query::LakeQuery;
use crate::sink::delta::Lake;
use crate::sink::delta::collection::DEAD_LETTERS;
use crate::telemetry::Telemetry;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// How many of a user's transactions the chart shows (the latest).
const CHART_POINTS: usize = 2000;

/// What the dashboard serves.
pub struct Dashboard {
    /// The lake it reads (opened on every request: it may not exist yet), with the
    /// catalog and schema its tables are registered under.
    pub lake: crate::config::LakeConfig,
    /// Which lake tables the fraud view reads.
    pub tables: DashboardConfig,
    /// The pipeline's live figures, when one runs in this process.
    pub telemetry: Arc<Telemetry>,
    /// Required from every request when set.
    pub token: Option<String>,
}

/// The dashboard could not start.
#[derive(Debug, thiserror::Error)]
#[error("dashboard: cannot listen on {listen}: {source} (set `[dashboard] listen` or --listen)")]
pub struct BindError {
    listen: String,
    #[source]
    source: std::io::Error,
}

/// Binds the listening socket (so a busy port is reported before anything starts).
pub async fn bind(listen: &str) -> Result<tokio::net::TcpListener, BindError> {
    let err = |source| BindError {
        listen: listen.to_string(),
        source,
    };
    let addr: SocketAddr = listen.parse().map_err(|e| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not an address:port ({e})"),
        ))
    })?;
    tokio::net::TcpListener::bind(addr).await.map_err(err)
}

/// Serves the dashboard until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    dashboard: Dashboard,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr()
        && !addr.ip().is_loopback()
        && dashboard.token.is_none()
    {
        tracing::warn!(%addr, "the dashboard listens beyond this machine without an access token (set [dashboard] token_env or token_file)");
    }
    let state = Arc::new(dashboard);
    let app = Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/app.css", get(app_css))
        .route("/api/users", get(users))
        .route("/api/users/{id}/chart", get(user_chart))
        .route("/api/alerts", get(alerts))
        .route("/api/pipeline", get(pipeline))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such page") })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}

type Shared = Arc<Dashboard>;

/// A failed request: a status and a plain message for the page.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<crate::query::QueryError> for ApiError {
    fn from(e: crate::query::QueryError) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

async fn authorize(State(state): State<Shared>, req: Request, next: Next) -> Response {
    // The page and its assets are no secret; the data (`/api`, `/metrics`) is.
    let public = matches!(req.uri().path(), "/" | "/app.js" | "/app.css" | "/healthz");
    let Some(token) = state.token.as_ref().filter(|_| !public) else {
        return next.run(req).await;
    };
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let query = req.uri().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    });
    let given = bearer.or(query).unwrap_or_default();
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this dashboard needs its access token: open it with ?token=<token> or send \
             `Authorization: Bearer <token>`",
        )
        .into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn app_js() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/javascript; charset=utf-8"),
        )],
        APP_JS,
    )
}

async fn app_css() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/css; charset=utf-8"),
        )],
        APP_CSS,
    )
}

async fn metrics(State(state): State<Shared>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        state.telemetry.encode(),
    )
}

/// Opens the lake for one request; an empty or missing lake is said plainly.
async fn open(state: &Dashboard) -> Result<LakeQuery, ApiError> {
    let lake = &state.lake.url;
    let not_ready = |e: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("The lake {lake} cannot be read yet ({e}). Start `weir run` to fill it."),
        )
    };
    let opened = Lake::from_config(&state.lake, false).map_err(|e| not_ready(&e))?;
    let q = LakeQuery::open(&opened, &state.lake.catalog, &state.lake.schema)
        .await
        .map_err(|e| match e {
            crate::query::QueryError::Lake { .. } => not_ready(&e),
            other => other.into(),
        })?;
    if q.tables.is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("The lake {lake} has no Delta tables yet. Start `weir run` to fill it."),
        ));
    }
    Ok(q)
}

/// The fraud view's tables as they are in the lake now.
struct FraudTables<'a> {
    tx: &'a str,
    /// `NOT deleted` for soft-deleted replicas, else `TRUE`.
    tx_live: &'static str,
    /// The alerts table, when it exists (the fraud rule creates it with its first alert).
    alerts: Option<&'a str>,
    users: Option<&'a str>,
}

fn fraud_tables<'a>(state: &'a Dashboard, q: &LakeQuery) -> Result<FraudTables<'a>, ApiError> {
    let t = &state.tables;
    let Some(tx) = q.table(&t.transactions) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "The lake has no `{}` table (tables: {}). The fraud view needs the replica of \
                 the transactions table; set `[dashboard] transactions` if it has another name.",
                t.transactions,
                q.tables.join(", ")
            ),
        ));
    };
    for column in ["transaction_id", "user_id", "transaction_date", "amount"] {
        if !tx.columns.iter().any(|c| c == column) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "Table `{}` has no `{column}` column: it is not a transactions table.",
                    t.transactions
                ),
            ));
        }
    }
    let has = |table: &str, columns: &[&str]| {
        q.table(table)
            .is_some_and(|d| columns.iter().all(|c| d.columns.iter().any(|x| x == c)))
    };
    Ok(FraudTables {
        tx: &t.transactions,
        tx_live: if tx.columns.iter().any(|c| c == "_deleted") {
            "NOT COALESCE(t._deleted, FALSE)"
        } else {
            "TRUE"
        },
        alerts: has(
            &t.alerts,
            &[
                "transaction_id",
                "user_id",
                "is_anomaly",
                "user_avg",
                "amount",
            ],
        )
        .then_some(t.alerts.as_str()),
        users: has(&t.users, &["user_id", "name"]).then_some(t.users.as_str()),
    })
}

fn ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// Users by number of anomalies, then id.
async fn users(State(state): State<Shared>) -> Result<axum::Json<Value>, ApiError> {
    let q = open(&state).await?;
    let f = fraud_tables(&state, &q)?;
    let alerts = match f.alerts {
        Some(a) => format!(
            "LEFT JOIN (SELECT user_id, count(*) AS alerts FROM {} WHERE is_anomaly GROUP BY user_id) al \
             ON al.user_id = tx.user_id",
            ident(a)
        ),
        None => {
            "LEFT JOIN (SELECT 0 AS user_id, 0 AS alerts WHERE FALSE) al ON al.user_id = tx.user_id"
                .into()
        }
    };
    let (name_col, users_join) = match f.users {
        Some(u) => (
            "u.name",
            format!("LEFT JOIN {} u ON u.user_id = tx.user_id", ident(u)),
        ),
        None => ("CAST(NULL AS VARCHAR)", String::new()),
    };
    let sql = format!(
        "SELECT tx.user_id, {name_col} AS name, tx.transactions, COALESCE(al.alerts, 0) AS alerts \
         FROM (SELECT t.user_id, count(*) AS transactions FROM {} t WHERE {} GROUP BY t.user_id) tx \
         {alerts} {users_join} \
         ORDER BY alerts DESC, tx.user_id LIMIT 500",
        ident(f.tx),
        f.tx_live
    );
    let rows = q.json(&sql).await?;
    Ok(axum::Json(json!({
        "users": rows,
        "alerts_table": f.alerts.is_some(),
        "tables": { "transactions": state.tables.transactions, "alerts": state.tables.alerts, "users": state.tables.users },
    })))
}

/// One user's transactions as an SVG chart, anomalies in red.
async fn user_chart(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let user: i64 = id.trim().parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("`{id}` is not a user id (user ids are whole numbers)."),
        )
    })?;
    let q = open(&state).await?;
    let f = fraud_tables(&state, &q)?;
    let (alert_cols, alert_join) = match f.alerts {
        Some(a) => (
            "CAST(a.user_avg AS DOUBLE) AS user_avg, COALESCE(a.is_anomaly, FALSE) AS flagged",
            format!(
                "LEFT JOIN {} a ON a.transaction_id = t.transaction_id",
                ident(a)
            ),
        ),
        None => (
            "CAST(NULL AS DOUBLE) AS user_avg, FALSE AS flagged",
            String::new(),
        ),
    };
    let sql = format!(
        "SELECT * FROM (SELECT t.transaction_id, \
           CAST(date_part('epoch', t.transaction_date) * 1000 AS BIGINT) AS ts_ms, \
           CAST(t.amount AS DOUBLE) AS amount, {alert_cols} \
         FROM {} t {alert_join} WHERE t.user_id = {user} AND {} \
         ORDER BY ts_ms DESC, t.transaction_id DESC LIMIT {CHART_POINTS}) \
         ORDER BY ts_ms, transaction_id",
        ident(f.tx),
        f.tx_live
    );
    let rows = q.json(&sql).await?;
    let name = match f.users {
        Some(u) => q
            .json(&format!(
                "SELECT name FROM {} WHERE user_id = {user}",
                ident(u)
            ))
            .await?
            .into_iter()
            .next()
            .map(|r| r.get("name").cloned().unwrap_or(Value::Null)),
        None => None,
    };
    if rows.is_empty() && name.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "No user {user}: `{}` has no transactions of theirs{}.",
                state.tables.transactions,
                if f.users.is_some() {
                    format!(" and `{}` no such user", state.tables.users)
                } else {
                    String::new()
                }
            ),
        ));
    }
    let points: Vec<chart::Point> = rows.iter().filter_map(chart::Point::from_row).collect();
    let name = name.and_then(|v| v.as_str().map(str::to_string));
    let title = match &name {
        Some(n) => format!("{n} (user {user})"),
        None => format!("User {user}"),
    };
    let svg = chart::render(&title, &points);
    let anomalies: Vec<i64> = points
        .iter()
        .filter(|p| p.flagged)
        .map(|p| p.transaction_id)
        .collect();
    let average = if points.is_empty() {
        None
    } else {
        Some(points.iter().map(|p| p.amount).sum::<f64>() / points.len() as f64)
    };
    Ok(axum::Json(json!({
        "user_id": user,
        "name": name,
        "transactions": points.len(),
        "truncated": points.len() >= CHART_POINTS,
        "anomalies": anomalies,
        "average": average,
        "scored": f.alerts.is_some(),
        "svg": svg,
    })))
}

#[derive(Debug, Deserialize)]
struct AlertsQuery {
    limit: Option<usize>,
}

/// The latest anomalies across users.
async fn alerts(
    State(state): State<Shared>,
    Query(params): Query<AlertsQuery>,
) -> Result<axum::Json<Value>, ApiError> {
    let q = open(&state).await?;
    let f = fraud_tables(&state, &q)?;
    let Some(a) = f.alerts else {
        return Ok(axum::Json(json!({ "alerts": [], "note": format!(
            "No `{}` table yet: the fraud rule has not written any alert.", state.tables.alerts) })));
    };
    let limit = params.limit.unwrap_or(20).clamp(1, 500);
    let (name, users_join) = match f.users {
        Some(u) => (
            "u.name",
            format!("LEFT JOIN {} u ON u.user_id = a.user_id", ident(u)),
        ),
        None => ("CAST(NULL AS VARCHAR)", String::new()),
    };
    let sql = format!(
        "SELECT a.transaction_id, a.user_id, {name} AS name, CAST(a.amount AS DOUBLE) AS amount, \
           CAST(a.user_avg AS DOUBLE) AS user_avg, CAST(a.transaction_date AS VARCHAR) AS transaction_date, \
           CAST(date_part('epoch', a._commit_ts) * 1000 AS BIGINT) AS written_ms \
         FROM {} a {users_join} WHERE a.is_anomaly ORDER BY a._lsn DESC, a.transaction_id DESC LIMIT {limit}",
        ident(a)
    );
    let rows = q.json(&sql).await?;
    Ok(axum::Json(json!({ "alerts": rows })))
}

/// The pipeline view: live figures (when a pipeline runs here), tables, dead letters.
async fn pipeline(State(state): State<Shared>) -> Result<axum::Json<Value>, ApiError> {
    let live = state.telemetry.snapshot();
    let mut out = Map::new();
    out.insert(
        "live".into(),
        serde_json::to_value(&live).unwrap_or(Value::Null),
    );
    out.insert("lake".into(), Value::from(state.lake.url.clone()));
    let opened = match Lake::from_config(&state.lake, false) {
        Ok(lake) => LakeQuery::open(&lake, &state.lake.catalog, &state.lake.schema)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match opened {
        Ok(q) => {
            out.insert(
                "tables".into(),
                serde_json::to_value(
                    q.details
                        .iter()
                        .map(|d| json!({"name": d.name, "version": d.version, "last_commit_ms": d.last_commit_ms}))
                        .collect::<Vec<_>>(),
                )
                .unwrap_or(Value::Null),
            );
            let dead = if q.table(DEAD_LETTERS).is_some() {
                let count = q
                    .json(&format!(
                        "SELECT count(*) AS n FROM {}",
                        ident(DEAD_LETTERS)
                    ))
                    .await?
                    .first()
                    .and_then(|r| r.get("n").cloned())
                    .unwrap_or(Value::from(0));
                let recent = q
                    .json(&format!(
                        "SELECT plugin, kind, error, source_table, \
                           CAST(date_part('epoch', _commit_ts) * 1000 AS BIGINT) AS at_ms \
                         FROM {} ORDER BY _lsn DESC LIMIT 5",
                        ident(DEAD_LETTERS)
                    ))
                    .await?;
                json!({ "count": count, "recent": recent })
            } else {
                json!({ "count": 0, "recent": [] })
            };
            out.insert("dead_letters".into(), dead);
        }
        Err(e) => {
            out.insert("tables".into(), json!([]));
            out.insert("lake_error".into(), Value::from(e));
        }
    }
    Ok(axum::Json(Value::Object(out)))
}
