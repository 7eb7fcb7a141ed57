//! The HTTP API (DESIGN.md section 9): live distinct-client counts from the sketches,
//! experiment health, published statistics, Prometheus metrics and the results page.
//!
//! Served by `run --listen ADDR` while consuming, and by `serve` over existing state. Every
//! handler reads sled directly (on the blocking pool); answers are aggregates only.
//! With a bearer token configured (`SLIPSTREAM_TOKEN`, else `[pipeline] token_file`), every
//! endpoint but the liveness probe `/healthz` wants `Authorization: Bearer`; a readiness
//! probe sends it with `slipstream probe --ready` (an exec probe: a kubelet's HTTP probe
//! cannot read a Secret).
//! Requests are bounded: a query's date range is capped by `max_query_days` and its
//! sketch reads by `max_query_sketches`, parameters are validated before any sketch is
//! read, at most `max_concurrent_queries` requests run store work at once (others wait
//! `query_wait_millis`, then get a 503 with `Retry-After`), and request bodies and times
//! are limited.
//! Every refusal, down to a malformed query string, path or method, is the JSON
//! `{"error": ...}` of DESIGN.md section 9, naming the parameter where there is one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Request as HttpRequest, State};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::NaiveDate;
use serde_json::{json, Map, Value};

use crate::config::{Config, Experiment};
use crate::health::{self, EventTimes, Live};
use crate::sketch::{self, CountAnswer, Metered, Query, SketchConfig, SketchError, SketchSource};
use crate::state::Store;

/// What the handlers share.
pub struct Api {
    pub store: Store,
    pub cfg: Arc<Config>,
    pub sketch: SketchConfig,
    /// Set once the state is open (and, for `run`, the consumer is assigned).
    pub ready: Arc<AtomicBool>,
    /// Bearer token required on every endpoint but the probes (None: open, loopback only).
    pub token: Option<String>,
    /// The running pipeline's counters, for `/metrics` (None under `serve`).
    pub pipeline: Option<Arc<health::PipelineMetrics>>,
    /// Where `POST /v1/experiments/{slug}/finalize` sends its request: the loop that owns
    /// the pipeline (set by `run --listen`; under `serve` the route answers 409).
    pub finalize: std::sync::OnceLock<tokio::sync::mpsc::Sender<FinalizeRequest>>,
    /// When each experiment was last finalized over HTTP (rate limit).
    finalize_calls: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Slots for blocking work (`max_concurrent_queries`): each task holds one until its
    /// work ends, even after its request timed out, so abandoned work cannot pile up.
    queries: Arc<tokio::sync::Semaphore>,
    /// How long a request waits for a slot before it is answered 503 (`query_wait_millis`).
    query_wait: Duration,
    /// The API's own counters, appended to `/metrics`.
    registry: prometheus::Registry,
    /// Requests answered 503 because every slot stayed taken.
    busy_refusals: prometheus::IntCounter,
    /// Slots taken when `/metrics` is scraped (the scrape's own included).
    queries_running: prometheus::IntGauge,
}

/// A request to the process holding the state to run `finalize` for one experiment.
pub struct FinalizeRequest {
    pub slug: String,
    pub date: NaiveDate,
    pub reply: tokio::sync::oneshot::Sender<Result<crate::finalize::Status, String>>,
}

impl Api {
    /// The API over `store`, with the bearer token from [`bearer_token`]; fails when the
    /// configured token file cannot be read.
    pub fn new(store: Store, cfg: Arc<Config>) -> Result<Arc<Api>, String> {
        Ok(Arc::new(Api::build(store, cfg, None)?))
    }

    /// An API that also exposes a running pipeline's counters at `/metrics`.
    pub fn with_metrics(
        store: Store,
        cfg: Arc<Config>,
        metrics: Arc<health::PipelineMetrics>,
    ) -> Result<Arc<Api>, String> {
        Ok(Arc::new(Api::build(store, cfg, Some(metrics))?))
    }

    fn build(
        store: Store,
        cfg: Arc<Config>,
        pipeline: Option<Arc<health::PipelineMetrics>>,
    ) -> Result<Api, String> {
        let sketch = cfg.pipeline.sketch_config();
        let registry = prometheus::Registry::new();
        let busy_refusals = prometheus::IntCounter::new(
            "slipstream_http_busy_refusals_total",
            "Requests answered 503 because max_concurrent_queries query tasks were running.",
        )
        .expect("valid metric");
        let queries_running = prometheus::IntGauge::new(
            "slipstream_http_queries_running",
            "Query tasks running on the blocking pool (this scrape's included).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(busy_refusals.clone()))
            .expect("unique names");
        registry
            .register(Box::new(queries_running.clone()))
            .expect("unique names");
        Ok(Api {
            token: bearer_token(&cfg.pipeline)?,
            queries: Arc::new(tokio::sync::Semaphore::new(
                cfg.pipeline.max_concurrent_queries,
            )),
            query_wait: Duration::from_millis(cfg.pipeline.query_wait_millis),
            registry,
            busy_refusals,
            queries_running,
            store,
            cfg,
            sketch,
            ready: Arc::new(AtomicBool::new(false)),
            pipeline,
            finalize: std::sync::OnceLock::new(),
            finalize_calls: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// The configured experiment `slug`, or a 404 that says so.
    fn experiment(&self, slug: &str) -> Result<&Experiment, ApiError> {
        self.cfg
            .experiments
            .iter()
            .find(|e| e.slug == slug)
            .ok_or_else(|| {
                ApiError(
                    StatusCode::NOT_FOUND,
                    format!("experiment `{slug}` is not configured"),
                )
            })
    }

    /// The store, for one request's sketch queries: at most `max_query_sketches` reads.
    fn metered(&self) -> Metered<'_> {
        Metered::new(&self.store, self.sketch.max_query_sketches)
    }

    /// The stream's side of health: the clock and the persisted event times.
    fn live(&self) -> Result<Live, ApiError> {
        Ok(Live {
            now_micros: chrono::Utc::now().timestamp_micros(),
            event_times: EventTimes::read(&self.store).map_err(internal)?,
            allowed_lateness_hours: self.cfg.pipeline.allowed_lateness_hours,
            consumer_lag: self.pipeline.as_ref().map(|p| p.consumer_lag()),
        })
    }
}

/// Environment variable holding the optional bearer token (wins over `token_file`).
pub const TOKEN_ENV: &str = "SLIPSTREAM_TOKEN";

/// The bearer token the API requires, if any: `SLIPSTREAM_TOKEN` when set and not empty,
/// else the contents of `[pipeline] token_file`. The server and `slipstream probe` both
/// resolve it here, so they cannot disagree.
pub fn bearer_token(cfg: &crate::config::PipelineConfig) -> Result<Option<String>, String> {
    if let Some(t) = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()) {
        return Ok(Some(t));
    }
    cfg.token_file
        .as_deref()
        .map(|p| read_token_file(p).map_err(|e| format!("pipeline.token_file: {e}")))
        .transpose()
}

/// Reads a token file: one token of visible ASCII, surrounding whitespace (the trailing
/// newline) ignored. Read once at start: restart the server after rotating it.
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    if !path.is_absolute() {
        return Err(format!(
            "{} is relative; expected an absolute path (the server and `slipstream probe` may run in different directories)",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read {}: {e}; expected a file holding the bearer token",
            path.display()
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "{} is empty; expected the bearer token (e.g. from `openssl rand -hex 32`)",
            path.display()
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{} holds spaces, control or non-ASCII characters inside the token; expected one line of visible ASCII",
            path.display()
        ));
    }
    Ok(token.to_string())
}

/// An error answered as `{"error": "..."}` with a status.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

impl From<health::HealthError> for ApiError {
    fn from(e: health::HealthError) -> Self {
        internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

impl From<SketchError> for ApiError {
    fn from(e: SketchError) -> Self {
        match e {
            SketchError::BadQuery(m) => ApiError::bad(m),
            SketchError::OverBudget { limit } => ApiError::bad(format!(
                "the query reads more than {limit} sketches, the most one request may (pipeline.max_query_sketches); expected a shorter `start`..`end`, a shorter window or fewer `group_by` dimensions"
            )),
            other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

/// A request's query parameters, decoded strictly: `+` is a space, every `%` starts two
/// hex digits, the result is UTF-8, and each name appears once. Anything else is a 400
/// that names the parameter (axum's own `Query` would decode lossily and keep the last
/// of repeated names).
struct Params(BTreeMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parse_query(parts.uri.query().unwrap_or("")).map(Params)
    }
}

fn parse_query(query: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let mut params = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(raw_name)
            .map_err(|why| ApiError::bad(format!("parameter name `{raw_name}` {why}")))?;
        if name.is_empty() {
            return Err(ApiError::bad(format!(
                "`{pair}` has no parameter name; expected name=value"
            )));
        }
        let value =
            percent_decode(raw_value).map_err(|why| ApiError::bad(format!("`{name}` {why}")))?;
        if params.contains_key(&name) {
            return Err(ApiError::bad(format!(
                "`{name}` is given more than once; expected it once"
            )));
        }
        params.insert(name, value);
    }
    Ok(params)
}

/// Decodes one name or value of a query string; the error completes "`name` ...".
fn percent_decode(raw: &str) -> Result<String, String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
                let Some(hex) = hex else {
                    return Err(format!(
                        "has a malformed percent-escape `{}`; expected `%` and two hex digits",
                        String::from_utf8_lossy(&bytes[i..bytes.len().min(i + 3)])
                    ));
                };
                let digit = |c: u8| (c as char).to_digit(16).expect("hex digit") as u8;
                out.push(digit(hex[0]) << 4 | digit(hex[1]));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out)
        .map_err(|_| "is not UTF-8 once percent-decoded; expected UTF-8 text".to_string())
}

/// The `{slug}` of an experiment's path; one that does not decode is a 400 naming it.
struct Slug(String);

impl<S: Send + Sync> FromRequestParts<S> for Slug {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(slug)) => Ok(Slug(slug)),
            Err(e) => Err(ApiError(
                e.status(),
                format!(
                    "`slug` in the path: {}; expected a configured experiment slug",
                    e.body_text()
                ),
            )),
        }
    }
}

/// The request body limit (no endpoint reads a body).
const BODY_LIMIT_BYTES: usize = 64 * 1024;
/// Longest a request may take before it is answered 503.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Gives the errors that the router and the layers answer themselves (a body over the
/// limit, a timeout) the API's JSON error body, keeping their status and headers.
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    let json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "the request body is over {BODY_LIMIT_BYTES} bytes; expected no body"
        ),
        StatusCode::SERVICE_UNAVAILABLE => format!(
            "no answer within {} s; ask for less (a shorter `start`..`end`, fewer `group_by` dimensions) or retry later",
            REQUEST_TIMEOUT.as_secs()
        ),
        s => s.canonical_reason().unwrap_or("error").to_string(),
    };
    let (mut parts, _) = res.into_parts();
    parts.headers.remove(header::CONTENT_TYPE);
    parts.headers.remove(header::CONTENT_LENGTH);
    let mut out = ApiError(status, message).into_response();
    for (name, value) in parts.headers.drain() {
        if let Some(name) = name {
            out.headers_mut().entry(name).or_insert(value);
        }
    }
    out
}

/// The routes, with request limits.
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/dau", get(|s, p| counting(s, p, 1)))
        .route("/v1/wau", get(|s, p| counting(s, p, 7)))
        .route("/v1/mau", get(|s, p| counting(s, p, 28)))
        .route("/v1/engagement", get(engagement))
        .route("/v1/sketch", get(union_sketch))
        .route("/v1/experiments", get(experiments))
        .route("/v1/experiments/{slug}/dau", get(experiment_dau))
        .route("/v1/experiments/{slug}/health", get(experiment_health))
        .route(
            "/v1/experiments/{slug}/finalize",
            axum::routing::post(trigger_finalize),
        )
        .route(
            "/v1/experiments/{slug}/statistics",
            get(experiment_statistics),
        )
        .route("/", get(index_page))
        .route("/experiments/{slug}", get(experiment_page))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such endpoint; see README.md (HTTP API)".into(),
            )
        })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            // The router adds the `Allow` header to a 405.
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "{method} is not allowed on {}; expected a method from the Allow header",
                    uri.path()
                ),
            )
        })
        .layer(middleware::from_fn_with_state(api.clone(), authorize))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            BODY_LIMIT_BYTES,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        .layer(middleware::map_response(json_errors))
        .with_state(api)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(api))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Constant-time equality: the time taken does not depend on where two equal-length
/// strings first differ, so a caller cannot guess the token byte by byte from timings.
/// (Only the length leaks, which says little about a random token.)
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimizer from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// Rejects requests without the bearer token, when one is configured (not `/healthz`,
/// which says only that the process answers).
async fn authorize(State(api): State<Arc<Api>>, req: HttpRequest, next: Next) -> Response {
    let Some(token) = &api.token else {
        return next.run(req).await;
    };
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same_secret(g.as_bytes(), token.as_bytes()) => next.run(req).await,
        _ => {
            let mut r = ApiError(
                StatusCode::UNAUTHORIZED,
                format!("missing or wrong bearer token; send `Authorization: Bearer <token>` with the token set in {TOKEN_ENV} or [pipeline] token_file (probes: `slipstream probe --ready`)"),
            )
            .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("valid header"),
            );
            r
        }
    }
}

/// Prometheus text exposition (see [`health::render_metrics`]).
async fn metrics(State(api): State<Arc<Api>>) -> Result<Response, ApiError> {
    blocking(api.clone(), move || {
        let mut text = health::render_metrics(
            &api.store,
            &api.cfg,
            &api.live()?,
            api.ready.load(Ordering::Relaxed),
            api.pipeline.as_deref(),
        )?;
        let slots = api.cfg.pipeline.max_concurrent_queries;
        let free = api.queries.available_permits();
        api.queries_running.set(slots.saturating_sub(free) as i64);
        prometheus::TextEncoder::new()
            .encode_utf8(&api.registry.gather(), &mut text)
            .map_err(internal)?;
        Ok(([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response())
    })
    .await
}

async fn readyz(State(api): State<Arc<Api>>) -> Response {
    if api.ready.load(Ordering::Relaxed) {
        "ready".into_response()
    } else {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: state not open or no partitions assigned yet".into(),
        )
        .into_response()
    }
}

/// Runs blocking store work off the async workers, in one of `max_concurrent_queries`
/// slots; when none frees up within `query_wait_millis`, a 503 with `Retry-After`.
async fn blocking<T: Send + 'static>(
    api: Arc<Api>,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let slot = tokio::time::timeout(api.query_wait, api.queries.clone().acquire_owned()).await;
    let Ok(Ok(slot)) = slot else {
        api.busy_refusals.inc();
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "busy: {} queries are running, the most at once (pipeline.max_concurrent_queries); retry after Retry-After seconds",
                api.cfg.pipeline.max_concurrent_queries
            ),
        ));
    };
    tokio::task::spawn_blocking(move || {
        // Dropped when the work ends, not when the request does (a timeout).
        let _slot = slot;
        f()
    })
    .await
    .map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("query task failed: {e}"),
        )
    })?
}

fn parse_date(name: &str, v: &str) -> Result<NaiveDate, ApiError> {
    NaiveDate::parse_from_str(v, "%Y-%m-%d").map_err(|_| {
        ApiError::bad(format!(
            "`{name}` is \"{v}\"; expected a date like 2026-11-02"
        ))
    })
}

/// A validated counting request: the dates asked for, filters and grouping.
struct Request {
    /// One date, or every date of `start..=end` (a time series).
    dates: Vec<NaiveDate>,
    series: bool,
    filters: Vec<(String, String)>,
    group_by: Vec<String>,
}

const RESERVED: [&str; 4] = ["date", "start", "end", "group_by"];

fn request(
    api: &Api,
    params: &BTreeMap<String, String>,
    window_days: u32,
) -> Result<Request, ApiError> {
    let dims = api.sketch.dimensions.names();
    let mut filters = Vec::new();
    for (k, v) in params {
        if RESERVED.contains(&k.as_str()) {
            continue;
        }
        if !dims.iter().any(|d| d == k) {
            return Err(ApiError::bad(format!("unknown parameter or dimension `{k}`; expected date, start, end, group_by or one of the dimensions {dims:?}")));
        }
        filters.push((k.clone(), v.clone()));
    }
    let group_by: Vec<String> = match params.get("group_by") {
        Some(g) => g
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        None => Vec::new(),
    };
    if group_by.is_empty() && params.contains_key("group_by") {
        return Err(ApiError::bad(
            "`group_by` is empty; expected one or two dimensions, comma-separated",
        ));
    }
    if group_by.len() > 2 {
        return Err(ApiError::bad(format!(
            "`group_by` has {} dimensions; expected at most 2",
            group_by.len()
        )));
    }
    for (i, g) in group_by.iter().enumerate() {
        if !dims.iter().any(|d| d == g) {
            return Err(ApiError::bad(format!(
                "`group_by` dimension `{g}` is unknown; expected one of {dims:?}"
            )));
        }
        if group_by[..i].contains(g) {
            return Err(ApiError::bad(format!(
                "`group_by` names `{g}` twice; expected distinct dimensions"
            )));
        }
        if params.contains_key(g) {
            return Err(ApiError::bad(format!(
                "`{g}` is both a filter and in `group_by`; expected one or the other"
            )));
        }
    }
    let (dates, series) = match (params.get("date"), params.get("start"), params.get("end")) {
        (Some(d), None, None) => (vec![parse_date("date", d)?], false),
        (None, Some(s), Some(e)) => {
            let (s, e) = (parse_date("start", s)?, parse_date("end", e)?);
            if e < s {
                return Err(ApiError::bad(format!("`end` {e} is before `start` {s}")));
            }
            let days = (e - s).num_days() as u32 + 1;
            let max = api.sketch.max_range_days;
            // Each point of a series reads a window of its own: bound the whole span.
            if days + window_days - 1 > max {
                return Err(ApiError::bad(format!("`start`..`end` ({s}..{e}) with a {window_days}-day window spans {} days; the maximum is {max} (pipeline.max_query_days)", days + window_days - 1)));
            }
            (
                (0..days)
                    .map(|i| s + chrono::Days::new(u64::from(i)))
                    .collect(),
                true,
            )
        }
        (date, start, end) => {
            let what = match (date, start, end) {
                (None, None, None) => "`date` is missing",
                (None, Some(_), None) => "`end` is missing",
                (None, None, Some(_)) => "`start` is missing",
                _ => "`date` and `start`/`end` are both given",
            };
            return Err(ApiError::bad(format!(
                "{what}; expected either `date=YYYY-MM-DD` or both `start` and `end`"
            )));
        }
    };
    Ok(Request {
        dates,
        series,
        filters,
        group_by,
    })
}

/// A count: the estimate is a whole number of clients.
fn answer_json(a: &CountAnswer) -> Map<String, Value> {
    let mut m = ratio_json(a);
    m.insert("estimate".into(), json!(a.estimate.round()));
    m
}

/// A ratio (or any answer whose estimate is not a count).
fn ratio_json(a: &CountAnswer) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("estimate".into(), json!(a.estimate));
    m.insert("standard_error".into(), json!(a.standard_error));
    m.insert("lower".into(), json!(a.lower));
    m.insert("upper".into(), json!(a.upper));
    m
}

fn filters_json(filters: &[(String, String)]) -> Value {
    Value::Object(filters.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
}

/// One date's answer (or groups) for a window of `days` ending at `date`.
fn count_one(
    api: &Api,
    src: &dyn SketchSource,
    date: NaiveDate,
    days: u32,
    req: &Request,
) -> Result<Map<String, Value>, ApiError> {
    let mut q = Query::window(date, days);
    q.filters = req.filters.clone();
    q.group_by = req.group_by.clone();
    let mut out = Map::new();
    out.insert("date".into(), json!(date.to_string()));
    if days > 1 {
        out.insert("start".into(), json!(q.start.to_string()));
    }
    if q.group_by.is_empty() {
        out.extend(answer_json(&sketch::count(&api.sketch, src, &q)?));
    } else {
        let groups: Vec<Value> = sketch::group_by(&api.sketch, src, &q)?
            .into_iter()
            .map(|g| {
                let mut m = answer_json(&g.answer);
                for (dim, value) in g.values {
                    m.insert(dim, json!(value));
                }
                Value::Object(m)
            })
            .collect();
        out.insert("groups".into(), Value::Array(groups));
    }
    Ok(out)
}

async fn counting(State(api): State<Arc<Api>>, Params(params): Params, days: u32) -> ApiResult {
    let req = request(&api, &params, days)?;
    blocking(api.clone(), move || {
        let src = api.metered();
        let mut points = Vec::with_capacity(req.dates.len());
        for &d in &req.dates {
            points.push(count_one(&api, &src, d, days, &req)?);
        }
        let mut out = if req.series {
            let mut m = Map::new();
            m.insert("start".into(), json!(req.dates[0].to_string()));
            m.insert(
                "end".into(),
                json!(req.dates[req.dates.len() - 1].to_string()),
            );
            m.insert(
                "series".into(),
                Value::Array(points.into_iter().map(Value::Object).collect()),
            );
            m
        } else {
            points.pop().expect("one date")
        };
        out.insert("window_days".into(), json!(days));
        out.insert("filters".into(), filters_json(&req.filters));
        Ok(Json(Value::Object(out)))
    })
    .await
}

/// DAU / MAU for one date (or a series), with the ratio's delta-method interval.
async fn engagement(State(api): State<Arc<Api>>, Params(params): Params) -> ApiResult {
    if params.contains_key("group_by") {
        return Err(ApiError::bad(
            "`group_by` is not supported for /v1/engagement",
        ));
    }
    let req = request(&api, &params, 28)?;
    blocking(api.clone(), move || {
        let src = api.metered();
        let mut points = Vec::new();
        for &date in &req.dates {
            let q = |days| {
                let mut q = Query::window(date, days);
                q.filters = req.filters.clone();
                q
            };
            let dau = sketch::count(&api.sketch, &src, &q(1))?;
            let mau = sketch::count(&api.sketch, &src, &q(28))?;
            let mut m = match dau.ratio(&mau) {
                Some(r) => ratio_json(&r),
                None => {
                    let mut m = Map::new();
                    m.insert("estimate".into(), Value::Null);
                    m
                }
            };
            m.insert("date".into(), json!(date.to_string()));
            m.insert("dau".into(), Value::Object(answer_json(&dau)));
            m.insert("mau".into(), Value::Object(answer_json(&mau)));
            points.push(Value::Object(m));
        }
        let mut out = if req.series {
            let mut m = Map::new();
            m.insert("series".into(), Value::Array(points));
            m
        } else {
            match points.pop() {
                Some(Value::Object(m)) => m,
                _ => Map::new(),
            }
        };
        out.insert("filters".into(), filters_json(&req.filters));
        Ok(Json(Value::Object(out)))
    })
    .await
}

/// The union sketch of a segment over a range, serialized (format in `sketch` module docs).
async fn union_sketch(State(api): State<Arc<Api>>, Params(params): Params) -> ApiResult {
    if params.contains_key("group_by") {
        return Err(ApiError::bad("`group_by` is not supported for /v1/sketch"));
    }
    let req = request(&api, &params, 1)?;
    blocking(api.clone(), move || {
        let q = Query {
            start: req.dates[0],
            end: req.dates[req.dates.len() - 1],
            filters: req.filters.clone(),
            group_by: Vec::new(),
        };
        let mut s = sketch::union_sketch(&api.sketch, &api.metered(), &q)?;
        let mut out = answer_json(&s.answer());
        out.insert("start".into(), json!(q.start.to_string()));
        out.insert("end".into(), json!(q.end.to_string()));
        out.insert("filters".into(), filters_json(&req.filters));
        out.insert("format".into(), json!("slipstream-hll"));
        out.insert("format_version".into(), json!(1));
        out.insert("precision".into(), json!(api.sketch.precision.get()));
        out.insert("sketch".into(), json!(s.to_base64()));
        Ok(Json(Value::Object(out)))
    })
    .await
}

async fn experiments(State(api): State<Arc<Api>>) -> ApiResult {
    let summaries = blocking(api.clone(), {
        let api = api.clone();
        move || {
            let live = api.live()?;
            api.cfg
                .experiments
                .iter()
                .map(|e| {
                    let h = health::health(&api.store, &api.sketch, e, &live)?;
                    let sources = h.data_sources.map(|r| r.sources).unwrap_or_default();
                    Ok(json!({
                        "status": h.status,
                        "enrolled_total": h.enrolled_total,
                        "data_sources": sources,
                    }))
                })
                .collect::<Result<Vec<Value>, ApiError>>()
        }
    })
    .await?;
    let list: Vec<Value> = api
        .cfg
        .experiments
        .iter()
        .zip(summaries)
        .map(|(e, health)| {
            json!({
                "health": health,
                "slug": e.slug,
                "branches": e.branches.iter().map(|b| json!({"name": b.name, "ratio": b.ratio})).collect::<Vec<_>>(),
                "reference_branch": e.reference_branch,
                "enrollment_start": e.enrollment_start.to_string(),
                "last_enrollment_date": e.last_enrollment_date().to_string(),
                "end_date": e.end_date.to_string(),
            })
        })
        .collect();
    Ok(Json(json!({ "experiments": list })))
}

/// Clients active per branch (by the branch their telemetry reported) on a date or range.
async fn experiment_dau(
    State(api): State<Arc<Api>>,
    Slug(slug): Slug,
    Params(params): Params,
) -> ApiResult {
    let exp = api.experiment(&slug)?;
    if let Some(k) = params
        .keys()
        .find(|k| !["date", "start", "end"].contains(&k.as_str()))
    {
        return Err(ApiError::bad(format!(
            "unknown parameter `{k}`; expected date, or start and end"
        )));
    }
    let req = request(&api, &params, 1)?;
    let branches: Vec<String> = exp.branches.iter().map(|b| b.name.clone()).collect();
    blocking(api.clone(), move || {
        let src = api.metered();
        let mut points = Vec::new();
        for &date in &req.dates {
            let found = sketch::experiment_branches(&api.sketch, &src, &slug, date, date)?;
            let list: Vec<Value> = branches
                .iter()
                .map(|b| {
                    let a = found
                        .iter()
                        .find(|(name, _)| name == b)
                        .map(|(_, a)| *a)
                        .unwrap_or(CountAnswer::new(0.0, 0.0));
                    let mut m = answer_json(&a);
                    m.insert("branch".into(), json!(b));
                    Value::Object(m)
                })
                .collect();
            points.push(json!({ "date": date.to_string(), "branches": list }));
        }
        let out = if req.series {
            json!({ "experiment": slug, "series": points })
        } else {
            let mut p = points.pop().unwrap_or(Value::Null);
            p["experiment"] = json!(slug);
            p
        };
        Ok(Json(out))
    })
    .await
}

/// Live health of one experiment (see [`health::health`]).
async fn experiment_health(
    State(api): State<Arc<Api>>,
    Slug(slug): Slug,
    Params(params): Params,
) -> ApiResult {
    api.experiment(&slug)?;
    if let Some(k) = params.keys().next() {
        return Err(ApiError::bad(format!(
            "unknown parameter `{k}`; /health takes none"
        )));
    }
    blocking(api.clone(), move || {
        let exp = api.experiment(&slug)?;
        let h = health::health(&api.store, &api.sketch, exp, &api.live()?)?;
        Ok(Json(serde_json::to_value(h).map_err(internal)?))
    })
    .await
}

/// Published statistics rows of one period, as the `statistics_<slug>_<period>` view.
async fn experiment_statistics(
    State(api): State<Arc<Api>>,
    Slug(slug): Slug,
    Params(params): Params,
) -> ApiResult {
    let exp = api.experiment(&slug)?;
    let periods: Vec<&str> = exp.periods.iter().map(|p| p.view_name()).collect();
    let Some(given) = params.get("period") else {
        return Err(ApiError::bad(format!(
            "`period` is missing; expected one of {periods:?}"
        )));
    };
    let period = health::parse_period(given)
        .filter(|p| exp.periods.contains(p))
        .ok_or_else(|| {
            ApiError::bad(format!(
                "`period` is \"{given}\"; expected one of {periods:?} (the experiment's periods)"
            ))
        })?;
    let mut filters = Vec::new();
    for (k, v) in &params {
        if k == "period" {
            continue;
        }
        if !health::STATISTICS_FILTERS.contains(&k.as_str()) {
            return Err(ApiError::bad(format!(
                "unknown parameter `{k}`; expected period or one of {:?}",
                health::STATISTICS_FILTERS
            )));
        }
        filters.push((k.clone(), v.clone()));
    }
    blocking(api.clone(), move || {
        let exp = api.experiment(&slug)?;
        let rows = health::statistics_rows(&api.store, exp, period, &filters).map_err(internal)?;
        Ok(Json(json!({
            "experiment": slug,
            "period": period.view_name(),
            "filters": filters_json(&filters),
            "rows": rows,
        })))
    })
    .await
}

/// The results page's index: every experiment with its health summary.
async fn index_page(State(api): State<Arc<Api>>) -> Result<Html<String>, ApiError> {
    blocking(api.clone(), move || {
        let live = api.live()?;
        let mut list = Vec::new();
        for e in &api.cfg.experiments {
            let h = health::health(&api.store, &api.sketch, e, &live)?;
            list.push((e, h.status, h.enrolled_total));
        }
        Ok(Html(crate::web::index_page(&list)))
    })
    .await
}

/// The results page of one experiment: statistics, uplift, enrollment, DAU, MAU and
/// DAU/MAU, windows.
async fn experiment_page(
    State(api): State<Arc<Api>>,
    Slug(slug): Slug,
) -> Result<Html<String>, ApiError> {
    api.experiment(&slug)?;
    blocking(api.clone(), move || {
        let exp = api.experiment(&slug)?;
        let live = api.live()?;
        let h = health::health(&api.store, &api.sketch, exp, &live)?;
        let period = if exp.periods.contains(&crate::config::Period::Week) {
            crate::config::Period::Week
        } else {
            exp.periods
                .first()
                .copied()
                .unwrap_or(crate::config::Period::Overall)
        };
        let rows = health::statistics_rows(&api.store, exp, period, &[]).map_err(internal)?;
        // DAU and MAU from enrollment start to the newest event (or today), within the
        // end date, at most `max_query_days` of them.
        let newest = live
            .event_times
            .newest()
            .map(|t| t.day().date())
            .unwrap_or_else(|| chrono::Utc::now().date_naive());
        let longest = exp.enrollment_start
            + chrono::Days::new(u64::from(api.sketch.max_range_days.saturating_sub(1)));
        let last = newest.min(exp.end_date).min(longest);
        let activity =
            health::branch_activity(&api.sketch, &api.store, exp, exp.enrollment_start, last)?;
        Ok(Html(crate::web::experiment_page(
            &crate::web::ExperimentPage {
                exp,
                health: &h,
                period,
                rows: &rows,
                activity: &activity,
            },
        )))
    })
    .await
}

/// `POST /v1/experiments/{slug}/finalize[?date=YYYY-MM-DD]`: finalize one experiment now
/// (default date: yesterday, UTC), for data that lands at irregular times. The request
/// goes to the consume loop, which owns the pipeline, so only one process opens the state.
async fn trigger_finalize(
    State(api): State<Arc<Api>>,
    Slug(slug): Slug,
    Params(params): Params,
) -> Response {
    match finalize_now(&api, slug, &params).await {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn finalize_now(
    api: &Api,
    slug: String,
    params: &BTreeMap<String, String>,
) -> Result<Value, ApiError> {
    api.experiment(&slug)?;
    if let Some(k) = params.keys().find(|k| k.as_str() != "date") {
        return Err(ApiError::bad(format!(
            "unknown parameter `{k}`; expected only `date`"
        )));
    }
    let date = match params.get("date") {
        Some(d) => parse_date("date", d)?,
        None => chrono::Utc::now().date_naive() - chrono::Days::new(1),
    };
    let Some(tx) = api.finalize.get() else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "finalize over HTTP needs the process that holds the state (`slipstream run --listen`); this server only reads it: stop it and run `slipstream finalize`".into(),
        ));
    };
    let min = std::time::Duration::from_secs(api.cfg.pipeline.finalize_min_interval_secs);
    {
        let mut calls = api.finalize_calls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = calls.get(&slug).filter(|t| t.elapsed() < min) {
            return Err(ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                format!("`{slug}` was finalized {}s ago; at most once every {}s (pipeline.finalize_min_interval_secs)", last.elapsed().as_secs(), min.as_secs()),
            ));
        }
        calls.insert(slug.clone(), std::time::Instant::now());
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    let unavailable = || {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the pipeline is shutting down; try again".into(),
        )
    };
    tx.send(FinalizeRequest {
        slug: slug.clone(),
        date,
        reply,
    })
    .await
    .map_err(|_| unavailable())?;
    let status = answer
        .await
        .map_err(|_| unavailable())?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let body = json!({ "experiment": slug, "date": date.to_string(), "status": status.status });
    if status.failed() {
        return Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("finalize of `{slug}` for {date}: {}", status.status),
        ));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PipelineConfig;

    /// An API over an empty store with one query slot and a short wait.
    fn one_slot_api(dir: &std::path::Path) -> Arc<Api> {
        let cfg = Config {
            pipeline: PipelineConfig {
                max_concurrent_queries: 1,
                query_wait_millis: 50,
                ..PipelineConfig::default()
            },
            experiments: Vec::new(),
        };
        let store = Store::open(dir, &cfg).unwrap();
        Api::new(store, Arc::new(cfg)).unwrap()
    }

    async fn text(r: Response) -> String {
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abandoned_work_keeps_its_slot_and_a_full_pool_answers_503() {
        let dir = tempfile::tempdir().unwrap();
        let api = one_slot_api(dir.path());
        // A request gives up on its work (as the 30 s timeout does): the work goes on
        // and keeps the only slot until it ends.
        let (finish, finished) = std::sync::mpsc::channel::<()>();
        let abandoned = tokio::time::timeout(
            Duration::from_millis(100),
            blocking(api.clone(), move || {
                finished.recv().ok();
                Ok(())
            }),
        )
        .await;
        assert!(abandoned.is_err(), "the work should still be running");
        assert_eq!(api.queries.available_permits(), 0);
        let r = counting(
            State(api.clone()),
            Params(parse_query("date=2026-11-01").unwrap()),
            1,
        )
        .await
        .unwrap_err()
        .into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let body: Value = serde_json::from_str(&text(r).await).unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("max_concurrent_queries"), "{error}");
        // Once the work ends its slot is free: queries and /metrics answer again.
        finish.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while api.queries.available_permits() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the slot was never freed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let Json(answer) = counting(
            State(api.clone()),
            Params(parse_query("date=2026-11-01").unwrap()),
            1,
        )
        .await
        .unwrap_or_else(|e| panic!("{}", e.1));
        assert_eq!(answer["estimate"], 0.0);
        let scrape = text(
            metrics(State(api.clone()))
                .await
                .unwrap_or_else(|e| panic!("{}", e.1)),
        )
        .await;
        assert!(
            scrape.contains("slipstream_http_busy_refusals_total 1\n"),
            "{scrape}"
        );
        assert!(
            scrape.contains("slipstream_http_queries_running 1\n"),
            "{scrape}"
        );
    }

    fn query(q: &str) -> Result<Vec<(String, String)>, String> {
        parse_query(q)
            .map(|m| m.into_iter().collect())
            .map_err(|e| e.1)
    }

    #[test]
    fn query_strings_decode_strictly() {
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(query(""), Ok(vec![]));
        assert_eq!(
            query("&os=Windows+XP&&channel=%72elease%2C&x"),
            Ok(pairs(&[
                ("channel", "release,"),
                ("os", "Windows XP"),
                ("x", "")
            ]))
        );
        assert_eq!(query("os=%C3%A9"), Ok(pairs(&[("os", "é")])));
        for (q, needle) in [
            ("os=a&os=b", "`os` is given more than once"),
            ("os=%ZZ", "`os` has a malformed percent-escape `%ZZ`"),
            ("os=%+1", "`os` has a malformed percent-escape `%+1`"),
            ("os=%4", "`os` has a malformed percent-escape `%4`"),
            ("os=%", "`os` has a malformed percent-escape `%`"),
            ("os=%é", "`os` has a malformed percent-escape `%é`"),
            ("os=%FF", "`os` is not UTF-8"),
            ("os=%C3", "`os` is not UTF-8"),
            ("%FF=1", "parameter name `%FF` is not UTF-8"),
            ("=1", "`=1` has no parameter name"),
        ] {
            let err = query(q).unwrap_err();
            assert!(err.contains(needle), "{q}: {err}");
        }
    }
}
