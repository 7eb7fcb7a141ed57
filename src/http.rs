//! The HTTP API (DESIGN.md section 9): live distinct-client counts from the sketches.
//!
//! Served by `run --listen ADDR` while consuming, and by `serve` over existing state. Every
//! handler reads sled directly (on the blocking pool); answers are aggregates only.
//! Requests are bounded: a query's date range is capped by `max_query_days`, parameters
//! are validated before any sketch is read, and request bodies and times are limited.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query as QueryParams, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::NaiveDate;
use serde_json::{json, Map, Value};

use crate::config::Config;
use crate::sketch::{self, CountAnswer, Query, SketchConfig, SketchError};
use crate::state::Store;

/// What the handlers share.
pub struct Api {
    pub store: Store,
    pub cfg: Arc<Config>,
    pub sketch: SketchConfig,
    /// Set once the state is open (and, for `run`, the consumer is assigned).
    pub ready: Arc<AtomicBool>,
}

impl Api {
    pub fn new(store: Store, cfg: Arc<Config>) -> Arc<Api> {
        let sketch = cfg.pipeline.sketch_config();
        Arc::new(Api {
            store,
            cfg,
            sketch,
            ready: Arc::new(AtomicBool::new(false)),
        })
    }
}

/// An error answered as `{"error": "..."}` with a status.
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<SketchError> for ApiError {
    fn from(e: SketchError) -> Self {
        match e {
            SketchError::BadQuery(m) => ApiError::bad(m),
            other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

type Params = QueryParams<BTreeMap<String, String>>;
type ApiResult = Result<Json<Value>, ApiError>;

/// The routes, with request limits.
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/v1/dau", get(|s, p| counting(s, p, 1)))
        .route("/v1/wau", get(|s, p| counting(s, p, 7)))
        .route("/v1/mau", get(|s, p| counting(s, p, 28)))
        .route("/v1/engagement", get(engagement))
        .route("/v1/sketch", get(union_sketch))
        .route("/v1/experiments", get(experiments))
        .route("/v1/experiments/{slug}/dau", get(experiment_dau))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such endpoint; see README.md (HTTP API)".into(),
            )
        })
        .layer(tower_http::limit::RequestBodyLimitLayer::new(64 * 1024))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(30),
        ))
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

/// Runs blocking store work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
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
    if group_by.len() > 2 {
        return Err(ApiError::bad(format!(
            "group_by has {} dimensions; expected at most 2",
            group_by.len()
        )));
    }
    for g in &group_by {
        if !dims.iter().any(|d| d == g) {
            return Err(ApiError::bad(format!(
                "group_by dimension `{g}` is unknown; expected one of {dims:?}"
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
                return Err(ApiError::bad(format!("the range {s}..{e} with a {window_days}-day window spans {} days; the maximum is {max} (pipeline.max_query_days)", days + window_days - 1)));
            }
            (
                (0..days)
                    .map(|i| s + chrono::Days::new(u64::from(i)))
                    .collect(),
                true,
            )
        }
        _ => {
            return Err(ApiError::bad(
                "expected either `date=YYYY-MM-DD` or both `start` and `end`",
            ))
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
        out.extend(answer_json(&sketch::count(&api.sketch, &api.store, &q)?));
    } else {
        let groups: Vec<Value> = sketch::group_by(&api.sketch, &api.store, &q)?
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

async fn counting(
    State(api): State<Arc<Api>>,
    QueryParams(params): Params,
    days: u32,
) -> ApiResult {
    let req = request(&api, &params, days)?;
    blocking(move || {
        let mut points = Vec::with_capacity(req.dates.len());
        for &d in &req.dates {
            points.push(count_one(&api, d, days, &req)?);
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
async fn engagement(State(api): State<Arc<Api>>, QueryParams(params): Params) -> ApiResult {
    if params.contains_key("group_by") {
        return Err(ApiError::bad(
            "group_by is not supported for /v1/engagement",
        ));
    }
    let req = request(&api, &params, 28)?;
    blocking(move || {
        let mut points = Vec::new();
        for &date in &req.dates {
            let q = |days| {
                let mut q = Query::window(date, days);
                q.filters = req.filters.clone();
                q
            };
            let dau = sketch::count(&api.sketch, &api.store, &q(1))?;
            let mau = sketch::count(&api.sketch, &api.store, &q(28))?;
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
async fn union_sketch(State(api): State<Arc<Api>>, QueryParams(params): Params) -> ApiResult {
    if params.contains_key("group_by") {
        return Err(ApiError::bad("group_by is not supported for /v1/sketch"));
    }
    let req = request(&api, &params, 1)?;
    blocking(move || {
        let q = Query {
            start: req.dates[0],
            end: req.dates[req.dates.len() - 1],
            filters: req.filters.clone(),
            group_by: Vec::new(),
        };
        let mut s = sketch::union_sketch(&api.sketch, &api.store, &q)?;
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
    let list: Vec<Value> = api
        .cfg
        .experiments
        .iter()
        .map(|e| {
            json!({
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
    Path(slug): Path<String>,
    QueryParams(params): Params,
) -> ApiResult {
    let Some(exp) = api.cfg.experiments.iter().find(|e| e.slug == slug) else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("experiment `{slug}` is not configured"),
        ));
    };
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
    blocking(move || {
        let mut points = Vec::new();
        for &date in &req.dates {
            let found = sketch::experiment_branches(&api.sketch, &api.store, &slug, date, date)?;
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
