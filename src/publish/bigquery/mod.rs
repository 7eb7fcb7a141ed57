//! The BigQuery sink: rows through the Storage Write API (gRPC), tables, views and copy
//! jobs through the REST API (DESIGN.md sections 5 and 11).
//!
//! # How a table is replaced
//! 1. make sure the dataset exists (an in-memory emulator forgets it on restart);
//! 2. create a fresh staging table `<name>__staging_<unique>` with the table's schema;
//! 3. append the rows to a PENDING stream in chunks with offsets, finalize, commit;
//! 4. create the published table if missing, or delete and recreate it when its schema
//!    differs (a copy between different schemas empties the target on the emulator);
//! 5. copy the staging table over it with WRITE_TRUNCATE (atomic for readers);
//! 6. drop the staging table and any staging leftovers of earlier, interrupted attempts;
//! 7. for statistics tables, create or update the period's view (UNION ALL of the family).
//!
//! Every step is safe to repeat, so a failed attempt is retried from step 1 with capped
//! exponential backoff and jitter until the publication's deadline.
//!
//! # Threads
//! `Sink::publish` is synchronous and may be called from plain threads or from inside a
//! tokio runtime (via `block_in_place`). The sink therefore owns one thread with its own
//! current-thread runtime and talks to it over channels; dropping the sink stops it.

mod error;
mod rest;
mod rows;
mod write;

use std::sync::{mpsc, Arc};
use std::time::Duration;

use prost_types::DescriptorProto;
use serde_json::{json, Value as Json};
use tokio::time::Instant;

use super::{Column, ColumnType, PublishError, Sink, TableData, TableKind};
use error::{CallError, Class};
use rest::Rest;
use write::{EncodedRows, Writer};

/// The Google endpoints used when no emulator is configured.
const GOOGLE_REST: &str = "https://bigquery.googleapis.com";
const GOOGLE_GRPC: &str = "https://bigquerystorage.googleapis.com";
/// The OAuth scope of every call.
const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";
/// bqemulator's default gRPC port, used when only `BIGQUERY_EMULATOR_HOST` is set.
const EMULATOR_DEFAULT_GRPC_PORT: u16 = 9060;

/// Where and how to publish.
#[derive(Debug, Clone)]
pub struct BigQueryConfig {
    /// GCP project that owns the dataset (and is billed for queries and copy jobs).
    pub project: String,
    /// Dataset the tables and views go to; created if missing.
    pub dataset: String,
    /// REST root of an emulator, e.g. `http://127.0.0.1:9050`. With it (or `grpc_url`, or
    /// `BIGQUERY_EMULATOR_HOST`) the sink talks plain text without credentials.
    pub rest_url: Option<String>,
    /// gRPC endpoint of an emulator, e.g. `http://127.0.0.1:9060`.
    pub grpc_url: Option<String>,
    /// Location for the dataset and jobs (e.g. `US`, `EU`); None lets BigQuery choose.
    pub location: Option<String>,
    /// Bound on one `publish` (all retries included); past it, `PublishError::Transient`.
    pub timeout: Duration,
    /// Bound on any single call inside a publication (a 7th concurrent AppendRows
    /// connection to the emulator hangs silently: DESIGN.md section 11).
    pub call_timeout: Duration,
    /// Rows per AppendRows request (also capped at ~8 MB per request).
    pub chunk_rows: usize,
}

impl BigQueryConfig {
    /// Defaults: Google endpoints unless `BIGQUERY_EMULATOR_HOST` is set, 60 s per
    /// publication, 30 s per call, 5,000 rows per append.
    pub fn new(project: impl Into<String>, dataset: impl Into<String>) -> Self {
        BigQueryConfig {
            project: project.into(),
            dataset: dataset.into(),
            rest_url: None,
            grpc_url: None,
            location: None,
            timeout: Duration::from_secs(60),
            call_timeout: Duration::from_secs(30),
            chunk_rows: 5000,
        }
    }

    /// Parses the `--bigquery PROJECT.DATASET` form.
    pub fn from_target(target: &str) -> Result<Self, String> {
        // Domain-scoped project ids ("example.com:proj") contain dots; dataset ids never do.
        match target.rsplit_once('.') {
            Some((p, d)) if !p.is_empty() && !d.is_empty() => Ok(BigQueryConfig::new(p, d)),
            _ => Err(format!(
                "--bigquery expects PROJECT.DATASET (e.g. my-project.experiments), got {target:?}"
            )),
        }
    }

    /// The REST root, the gRPC URL, and whether they are an emulator (no TLS, no auth).
    fn endpoints(&self) -> (String, String, bool) {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let with_scheme = |h: String| {
            if h.contains("://") {
                h
            } else {
                format!("http://{h}")
            }
        };
        let rest = self
            .rest_url
            .clone()
            .or_else(|| env("BIGQUERY_EMULATOR_HOST"))
            .map(with_scheme);
        let grpc = self
            .grpc_url
            .clone()
            .or_else(|| env("BIGQUERY_STORAGE_EMULATOR_HOST"))
            .map(with_scheme);
        if rest.is_none() && grpc.is_none() {
            return (GOOGLE_REST.to_string(), GOOGLE_GRPC.to_string(), false);
        }
        let host_of = |u: &str| {
            let after = u.split_once("://").map(|(_, r)| r).unwrap_or(u);
            let hostport = after.split('/').next().unwrap_or(after);
            hostport
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or_else(|| hostport.to_string())
        };
        let rest = rest
            .unwrap_or_else(|| format!("http://{}:9050", host_of(grpc.as_deref().unwrap_or(""))));
        let grpc = grpc
            .unwrap_or_else(|| format!("http://{}:{EMULATOR_DEFAULT_GRPC_PORT}", host_of(&rest)));
        (rest, grpc, true)
    }
}

/// Application Default Credentials, resolved on first use.
pub(crate) struct Auth {
    provider: tokio::sync::OnceCell<Arc<dyn gcp_auth::TokenProvider>>,
}

impl Auth {
    async fn token(&self) -> Result<String, CallError> {
        let provider = self
            .provider
            .get_or_try_init(gcp_auth::provider)
            .await
            .map_err(|e| {
                CallError::permanent(format!(
                    "no Application Default Credentials ({e}); run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
                ))
            })?;
        let token = provider
            .token(&[SCOPE])
            .await
            .map_err(|e| CallError::transient(format!("fetching an access token: {e}")))?;
        Ok(token.as_str().to_string())
    }
}

/// Publishes tables to BigQuery (or an emulator). See the module docs for the steps.
pub struct BigQuerySink {
    /// Requests to the sink's own thread; dropping it stops that thread.
    jobs: mpsc::Sender<Job>,
    config: BigQueryConfig,
}

/// A table with its rows already encoded, ready for the sink's thread.
struct Prepared {
    name: String,
    kind: TableKind,
    columns: Vec<Column>,
    descriptor: DescriptorProto,
    rows: EncodedRows,
}

enum Job {
    Publish(Box<Prepared>, mpsc::SyncSender<Result<(), PublishError>>),
    Query(String, mpsc::SyncSender<Result<Vec<Json>, PublishError>>),
}

impl BigQuerySink {
    /// Starts the sink's thread. Touches no network: a service that is down now only makes
    /// the first publications fail with `Transient`.
    pub fn new(config: BigQueryConfig) -> Result<Self, PublishError> {
        let setup_error = |detail: String| PublishError::Permanent {
            table: format!("(BigQuery sink for {}.{})", config.project, config.dataset),
            detail,
        };
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
        let worker_config = config.clone();
        std::thread::Builder::new()
            .name("bigquery-sink".into())
            .spawn(move || worker(worker_config, inbox, ready_tx))
            .map_err(|e| setup_error(format!("cannot start the sink thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(BigQuerySink { jobs, config }),
            Ok(Err(e)) => Err(setup_error(e)),
            Err(_) => Err(setup_error("the sink thread stopped during setup".into())),
        }
    }

    /// Runs a standard-SQL query and returns its rows as JSON objects keyed by column name
    /// (INT64 as integers, FLOAT64 and NUMERIC as floats, BOOL as booleans, DATE and STRING
    /// as strings, NULL as null). Query errors that BigQuery reports inside an HTTP 200 are
    /// errors here.
    pub fn query_rows(&self, sql: &str) -> Result<Vec<Json>, PublishError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(Job::Query(sql.to_string(), tx), rx, "(query)")
    }

    fn submit<T>(
        &self,
        job: Job,
        rx: mpsc::Receiver<Result<T, PublishError>>,
        table: &str,
    ) -> Result<T, PublishError> {
        let stopped = || PublishError::Transient {
            table: table.to_string(),
            detail: "the BigQuery sink thread has stopped".into(),
        };
        self.jobs.send(job).map_err(|_| stopped())?;
        // The thread enforces the deadline itself; the grace only covers scheduling.
        match rx.recv_timeout(self.config.timeout + Duration::from_secs(10)) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(PublishError::Transient {
                table: table.to_string(),
                detail: format!("no answer within {:?}", self.config.timeout),
            }),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(stopped()),
        }
    }
}

impl Sink for BigQuerySink {
    fn publish(&mut self, table: &TableData) -> Result<(), PublishError> {
        let permanent = |detail: String| PublishError::Permanent {
            table: table.name.clone(),
            detail,
        };
        check_table_name(&table.name).map_err(permanent)?;
        if let TableKind::Statistics { view, .. } = &table.kind {
            check_table_name(view).map_err(permanent)?;
        }
        let descriptor = rows::descriptor(&table.columns).map_err(permanent)?;
        let mut encoded = Vec::with_capacity(table.rows.len());
        for (i, row) in table.rows.iter().enumerate() {
            let mut buf = Vec::new();
            rows::encode_row(&table.columns, row, i, &mut buf).map_err(permanent)?;
            encoded.push(buf);
        }
        let prepared = Prepared {
            name: table.name.clone(),
            kind: table.kind.clone(),
            columns: table.columns.clone(),
            descriptor,
            rows: EncodedRows::new(encoded, self.config.chunk_rows),
        };
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(Job::Publish(Box::new(prepared), tx), rx, &table.name)
    }

    fn describe(&self) -> String {
        format!("bigquery:{}.{}", self.config.project, self.config.dataset)
    }
}

/// Table names become parts of URLs and SQL: keep them to BigQuery's plain characters.
fn check_table_name(name: &str) -> Result<(), String> {
    if !name.is_empty()
        && name.len() <= 900
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        Ok(())
    } else {
        Err(format!(
            "table name {name:?} must be 1-900 letters, digits or '_' (slugs are normalized before publishing)"
        ))
    }
}

/// The sink's thread: owns the runtime and the clients, runs one job at a time.
fn worker(
    config: BigQueryConfig,
    inbox: mpsc::Receiver<Job>,
    ready: mpsc::SyncSender<Result<(), String>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot build a tokio runtime: {e}")));
            return;
        }
    };
    let publisher = match rt.block_on(async { Publisher::new(&config) }) {
        Ok(p) => p,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    while let Ok(job) = inbox.recv() {
        match job {
            Job::Publish(table, reply) => {
                let result = rt.block_on(publisher.publish(&table));
                let _ = reply.send(result);
            }
            Job::Query(sql, reply) => {
                let result = rt.block_on(publisher.query(&sql));
                let _ = reply.send(result);
            }
        }
    }
}

/// The async side: REST and gRPC clients and the publication steps.
struct Publisher {
    rest: Rest,
    writer: Writer,
    project: String,
    dataset: String,
    timeout: Duration,
}

impl Publisher {
    fn new(config: &BigQueryConfig) -> Result<Self, String> {
        let (rest_url, grpc_url, emulator) = config.endpoints();
        let auth = (!emulator).then(|| {
            Arc::new(Auth {
                provider: tokio::sync::OnceCell::new(),
            })
        });
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let location = config.location.clone().filter(|l| !l.is_empty());
        Ok(Publisher {
            rest: Rest::new(
                http,
                &rest_url,
                &config.project,
                location,
                auth.clone(),
                config.call_timeout,
            ),
            writer: Writer::new(&grpc_url, auth, config.call_timeout)?,
            project: config.project.clone(),
            dataset: config.dataset.clone(),
            timeout: config.timeout,
        })
    }

    async fn publish(&self, table: &Prepared) -> Result<(), PublishError> {
        let deadline = Instant::now() + self.timeout;
        retry(deadline, || self.attempt(table, deadline))
            .await
            .map_err(|(class, detail)| match class {
                Class::Permanent => PublishError::Permanent {
                    table: table.name.clone(),
                    detail,
                },
                _ => PublishError::Transient {
                    table: table.name.clone(),
                    detail,
                },
            })
    }

    async fn query(&self, sql: &str) -> Result<Vec<Json>, PublishError> {
        let deadline = Instant::now() + self.timeout;
        // A query naming a missing table is an answer, not something to wait for.
        retry(deadline, || async {
            self.rest.query(sql, deadline).await.map_err(|mut e| {
                if e.class == Class::NotFound {
                    e.class = Class::Permanent;
                }
                e
            })
        })
        .await
        .map_err(|(class, detail)| {
            let table = "(query)".to_string();
            match class {
                Class::Permanent => PublishError::Permanent { table, detail },
                _ => PublishError::Transient { table, detail },
            }
        })
    }

    /// One complete publication; every step may be repeated.
    async fn attempt(&self, t: &Prepared, deadline: Instant) -> Result<(), CallError> {
        let ds = &self.dataset;
        let schema = schema_json(&t.columns);
        self.rest.ensure_dataset(ds).await?;

        let staging = rest::unique_id(&format!("{}{STAGING}", t.name));
        self.rest
            .create_table(ds, &staging, Some(&schema), None)
            .await?;
        if t.rows.total > 0 {
            let path = format!("projects/{}/datasets/{ds}/tables/{staging}", self.project);
            let started = std::time::Instant::now();
            self.writer
                .write_pending(&path, &t.descriptor, &t.rows, deadline)
                .await
                .map_err(|e| e.context(format!("writing {} rows", t.rows.total)))?;
            let secs = started.elapsed().as_secs_f64();
            tracing::debug!(
                table = %t.name,
                rows = t.rows.total,
                seconds = secs,
                rows_per_second = t.rows.total as f64 / secs.max(1e-9),
                "rows appended and committed to the staging table"
            );
        }

        match self.rest.get_table(ds, &t.name).await? {
            None => {
                self.rest
                    .create_table(ds, &t.name, Some(&schema), None)
                    .await?;
            }
            Some(existing) if !same_schema(&existing, &schema) => {
                self.rest.delete_table(ds, &t.name).await?;
                self.rest
                    .create_table(ds, &t.name, Some(&schema), None)
                    .await?;
            }
            Some(_) => {}
        }
        let started = std::time::Instant::now();
        self.rest
            .copy_table(ds, &staging, &t.name, deadline)
            .await?;
        tracing::debug!(table = %t.name, seconds = started.elapsed().as_secs_f64(), "staging table copied over the published table");
        self.rest.delete_table(ds, &staging).await?;

        let tables = self.rest.list_tables(ds).await?;
        let leftover = format!("{}{STAGING}", t.name);
        for (id, _) in tables.iter().filter(|(id, _)| id.starts_with(&leftover)) {
            if *id != staging {
                // Best effort: a leftover of an interrupted attempt.
                let _ = self.rest.delete_table(ds, id).await;
            }
        }
        if let TableKind::Statistics {
            view, window_index, ..
        } = &t.kind
        {
            self.update_view(t, view, *window_index, &tables)
                .await
                .map_err(|e| e.context(format!("view {view}")))?;
        }
        Ok(())
    }

    /// Points the view at every table of the family, each with its `window_index`.
    async fn update_view(
        &self,
        t: &Prepared,
        view: &str,
        window_index: u32,
        tables: &[(String, String)],
    ) -> Result<(), CallError> {
        let ds = &self.dataset;
        let family = family_prefix(&t.name, window_index);
        let mut members: Vec<(u64, String)> = tables
            .iter()
            .filter(|(_, kind)| kind == "TABLE")
            .filter_map(|(id, _)| {
                let index = id.strip_prefix(&family)?.strip_prefix('_')?;
                (!index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| Some((index.parse().ok()?, id.clone())))
                    .flatten()
            })
            .collect();
        // tables.list may lag behind on BigQuery: the table just published is a member.
        members.push((window_index as u64, t.name.clone()));
        members.sort();
        members.dedup();
        let query = view_query(&self.project, ds, &t.columns, &members);
        match self.rest.get_table(ds, view).await? {
            Some(existing) if existing["view"]["query"].as_str() == Some(query.as_str()) => Ok(()),
            Some(_) => self.rest.patch_view(ds, view, &query).await,
            None => match self.rest.create_table(ds, view, None, Some(&query)).await? {
                rest::Created::New => Ok(()),
                rest::Created::AlreadyExisted => self.rest.patch_view(ds, view, &query).await,
            },
        }
    }
}

/// Marks staging tables; never a valid window index suffix, so views skip them.
const STAGING: &str = "__staging";

/// Time kept free at the deadline for one last attempt.
const LAST_ATTEMPT: Duration = Duration::from_millis(200);

/// Retries transient (and not-found) failures with capped exponential backoff and full
/// jitter until `deadline`; returns the last error's class and message.
async fn retry<T, F, Fut>(deadline: Instant, mut call: F) -> Result<T, (Class, String)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, CallError>>,
{
    let mut backoff = Duration::from_millis(200);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let err = match tokio::time::timeout(left, call()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if e.class == Class::Permanent => return Err((Class::Permanent, e.detail)),
            Ok(Err(e)) => e,
            Err(_) => CallError::transient("deadline reached during the attempt"),
        };
        tracing::debug!(attempts, error = %err.detail, "BigQuery call failed, retrying");
        // Retry until the deadline itself: the last pause is cut short so that one final
        // attempt still fits, rather than giving up early when the next backoff overruns.
        let left = deadline.saturating_duration_since(Instant::now());
        if left < LAST_ATTEMPT {
            return Err((
                Class::Transient,
                format!("gave up after {attempts} attempts: {}", err.detail),
            ));
        }
        let pause = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        tokio::time::sleep(pause.min(left - LAST_ATTEMPT / 2)).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The table's name without its `_<window_index>` suffix.
fn family_prefix(name: &str, window_index: u32) -> String {
    let suffix = format!("_{window_index}");
    match name.strip_suffix(&suffix) {
        Some(prefix) => prefix.to_string(),
        None => name
            .rsplit_once('_')
            .map(|(p, _)| p)
            .unwrap_or(name)
            .to_string(),
    }
}

/// `SELECT cols, i AS window_index FROM t_i UNION ALL ...`, in window order.
fn view_query(
    project: &str,
    dataset: &str,
    columns: &[Column],
    members: &[(u64, String)],
) -> String {
    let cols = columns
        .iter()
        .map(|c| format!("`{}`", c.name))
        .collect::<Vec<_>>()
        .join(", ");
    members
        .iter()
        .map(|(i, id)| {
            format!("SELECT {cols}, {i} AS window_index FROM `{project}.{dataset}.{id}`")
        })
        .collect::<Vec<_>>()
        .join("\nUNION ALL\n")
}

/// The REST `schema.fields` for our columns.
fn schema_json(columns: &[Column]) -> Json {
    Json::Array(
        columns
            .iter()
            .map(|c| {
                let kind = match c.kind {
                    ColumnType::String => "STRING",
                    ColumnType::Int64 => "INT64",
                    ColumnType::Float64 => "FLOAT64",
                    ColumnType::Bool => "BOOL",
                    ColumnType::Date => "DATE",
                    ColumnType::Numeric => "NUMERIC",
                };
                let mode = if c.nullable { "NULLABLE" } else { "REQUIRED" };
                json!({"name": c.name, "type": kind, "mode": mode})
            })
            .collect(),
    )
}

/// Whether an existing table has exactly these columns (BigQuery answers legacy type
/// names such as INTEGER for INT64, and may omit NULLABLE).
fn same_schema(existing: &Json, wanted: &Json) -> bool {
    if existing["type"].as_str().is_some_and(|t| t != "TABLE") {
        return false;
    }
    let norm = |f: &Json| {
        let kind = match f["type"].as_str().unwrap_or("") {
            "INTEGER" => "INT64",
            "FLOAT" => "FLOAT64",
            "BOOLEAN" => "BOOL",
            other => other,
        }
        .to_string();
        let mode = f["mode"].as_str().unwrap_or("NULLABLE").to_string();
        (f["name"].as_str().unwrap_or("").to_lowercase(), kind, mode)
    };
    let have: Vec<_> = existing["schema"]["fields"]
        .as_array()
        .map(|a| a.iter().map(norm).collect())
        .unwrap_or_default();
    let want: Vec<_> = wanted
        .as_array()
        .map(|a| a.iter().map(norm).collect())
        .unwrap_or_default();
    have == want
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_and_view_query() {
        assert_eq!(
            family_prefix("statistics_x_week_12", 12),
            "statistics_x_week"
        );
        assert_eq!(
            family_prefix("statistics_x_week_3", 12),
            "statistics_x_week"
        );
        let cols = vec![Column::new("point", ColumnType::Float64, true)];
        let q = view_query("p", "d", &cols, &[(1, "s_1".into()), (2, "s_2".into())]);
        assert_eq!(
            q,
            "SELECT `point`, 1 AS window_index FROM `p.d.s_1`\nUNION ALL\nSELECT `point`, 2 AS window_index FROM `p.d.s_2`"
        );
    }

    #[test]
    fn schema_comparison_normalizes_legacy_names() {
        let cols = vec![
            Column::new("a", ColumnType::Int64, true),
            Column::new("b", ColumnType::Bool, false),
        ];
        let wanted = schema_json(&cols);
        let existing = json!({"type": "TABLE", "schema": {"fields": [
            {"name": "a", "type": "INTEGER"}, {"name": "b", "type": "BOOLEAN", "mode": "REQUIRED"}]}});
        assert!(same_schema(&existing, &wanted));
        let fewer =
            json!({"type": "TABLE", "schema": {"fields": [{"name": "a", "type": "INTEGER"}]}});
        assert!(!same_schema(&fewer, &wanted));
    }

    #[test]
    fn targets_and_endpoints() {
        let c = BigQueryConfig::from_target("proj.ds").unwrap();
        assert_eq!((c.project.as_str(), c.dataset.as_str()), ("proj", "ds"));
        assert!(BigQueryConfig::from_target("proj").is_err());
        let mut c = BigQueryConfig::new("p", "d");
        c.rest_url = Some("http://127.0.0.1:1234".into());
        c.grpc_url = Some("127.0.0.1:1235".into());
        assert_eq!(
            c.endpoints(),
            (
                "http://127.0.0.1:1234".into(),
                "http://127.0.0.1:1235".into(),
                true
            )
        );
        assert!(check_table_name("statistics_x_week_1").is_ok());
        assert!(check_table_name("bad-name").is_err());
    }
}
