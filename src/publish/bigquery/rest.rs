//! The BigQuery REST API (v2) calls the sink needs: datasets, tables, views, copy jobs and
//! queries. Request bodies never carry a JSON `null` (the emulator answers those with 500).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value as Json};

use super::error::{self, CallError};
use super::Auth;

/// A REST client bound to one project.
pub struct Rest {
    http: reqwest::Client,
    /// `.../bigquery/v2/projects/PROJECT`
    base: String,
    project: String,
    location: Option<String>,
    auth: Option<Arc<Auth>>,
    call_timeout: Duration,
}

/// One HTTP answer: its status and its parsed body (`Null` when empty or not JSON).
struct Answer {
    status: u16,
    body: Json,
}

impl Answer {
    /// The body of a 2xx answer, or the classified error.
    fn ok(self) -> Result<Json, CallError> {
        if (200..300).contains(&self.status) {
            return Ok(self.body);
        }
        let err = &self.body["error"];
        let reason = err["errors"][0]["reason"]
            .as_str()
            .or_else(|| err["status"].as_str())
            .unwrap_or("");
        let message = err["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| self.body.to_string());
        Err(error::from_http(self.status, reason, &message))
    }
}

/// What creating something answered.
pub enum Created {
    New,
    AlreadyExisted,
}

impl Rest {
    pub fn new(
        http: reqwest::Client,
        root: &str,
        project: &str,
        location: Option<String>,
        auth: Option<Arc<Auth>>,
        call_timeout: Duration,
    ) -> Self {
        let root = root.trim_end_matches('/');
        let root = root.strip_suffix("/bigquery/v2").unwrap_or(root);
        Rest {
            http,
            base: format!("{root}/bigquery/v2/projects/{project}"),
            project: project.to_string(),
            location,
            auth,
            call_timeout,
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Json>,
    ) -> Result<Answer, CallError> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .timeout(self.call_timeout)
            .query(query);
        if let Some(auth) = &self.auth {
            req = req.bearer_auth(auth.token().await?);
        }
        if let Some(body) = body {
            debug_assert!(!contains_null(body), "JSON null in a request body: {body}");
            req = req.json(body);
        }
        let what = format!("{method} {path}");
        let resp = req
            .send()
            .await
            .map_err(|e| error::from_reqwest(&e).context(&what))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| error::from_reqwest(&e).context(&what))?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Json::Null);
        Ok(Answer { status, body })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Json>,
    ) -> Result<Json, CallError> {
        let what = format!("{method} {path}");
        self.send(method, path, query, body)
            .await?
            .ok()
            .map_err(|e| e.context(what))
    }

    /// Creates the dataset unless it exists (a GET first, so that an account allowed to
    /// write tables but not to create datasets works with an existing dataset).
    pub async fn ensure_dataset(&self, dataset: &str) -> Result<(), CallError> {
        let path = format!("/datasets/{dataset}");
        let answer = self.send(reqwest::Method::GET, &path, &[], None).await?;
        if answer.status != 404 {
            return answer
                .ok()
                .map(|_| ())
                .map_err(|e| e.context("get dataset"));
        }
        let mut body = json!({
            "datasetReference": {"projectId": self.project, "datasetId": dataset},
        });
        if let Some(location) = &self.location {
            body["location"] = json!(location);
        }
        let answer = self
            .send(reqwest::Method::POST, "/datasets", &[], Some(&body))
            .await?;
        if answer.status == 409 {
            return Ok(());
        }
        answer.ok().map(|_| ()).map_err(|e| {
            // The dataset is missing and cannot be created: retrying cannot help.
            let mut e = e.context(format!("create dataset {}.{dataset}", self.project));
            if e.class == error::Class::NotFound {
                e.class = error::Class::Permanent;
            }
            e
        })
    }

    /// The table's resource, or None when it does not exist.
    pub async fn get_table(&self, dataset: &str, table: &str) -> Result<Option<Json>, CallError> {
        let path = format!("/datasets/{dataset}/tables/{table}");
        let answer = self.send(reqwest::Method::GET, &path, &[], None).await?;
        if answer.status == 404 {
            return Ok(None);
        }
        answer
            .ok()
            .map(Some)
            .map_err(|e| e.context(format!("get table {table}")))
    }

    /// Creates a table (`schema`: BigQuery `fields` JSON) or a view (`view_query`).
    pub async fn create_table(
        &self,
        dataset: &str,
        table: &str,
        schema: Option<&Json>,
        view_query: Option<&str>,
    ) -> Result<Created, CallError> {
        let mut body = json!({
            "tableReference": {"projectId": self.project, "datasetId": dataset, "tableId": table},
        });
        if let Some(fields) = schema {
            body["schema"] = json!({ "fields": fields });
        }
        if let Some(query) = view_query {
            body["view"] = json!({"query": query, "useLegacySql": false});
        }
        let path = format!("/datasets/{dataset}/tables");
        let answer = self
            .send(reqwest::Method::POST, &path, &[], Some(&body))
            .await?;
        if answer.status == 409 {
            return Ok(Created::AlreadyExisted);
        }
        answer
            .ok()
            .map(|_| Created::New)
            .map_err(|e| e.context(format!("create table {table}")))
    }

    /// Deletes a table or view; a missing one is fine (repeating a step is safe).
    pub async fn delete_table(&self, dataset: &str, table: &str) -> Result<(), CallError> {
        let path = format!("/datasets/{dataset}/tables/{table}");
        let answer = self.send(reqwest::Method::DELETE, &path, &[], None).await?;
        if answer.status == 404 {
            return Ok(());
        }
        answer
            .ok()
            .map(|_| ())
            .map_err(|e| e.context(format!("delete table {table}")))
    }

    /// Replaces a view's query.
    pub async fn patch_view(
        &self,
        dataset: &str,
        view: &str,
        query: &str,
    ) -> Result<(), CallError> {
        let path = format!("/datasets/{dataset}/tables/{view}");
        let body = json!({"view": {"query": query, "useLegacySql": false}});
        self.call(reqwest::Method::PATCH, &path, &[], Some(&body))
            .await
            .map(|_| ())
    }

    /// Names of every table and view in the dataset, with their type ("TABLE", "VIEW").
    pub async fn list_tables(&self, dataset: &str) -> Result<Vec<(String, String)>, CallError> {
        let path = format!("/datasets/{dataset}/tables");
        let mut out = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let mut query = vec![("maxResults", "1000".to_string())];
            if let Some(token) = &page {
                query.push(("pageToken", token.clone()));
            }
            let body = self.call(reqwest::Method::GET, &path, &query, None).await?;
            for t in body["tables"].as_array().into_iter().flatten() {
                if let Some(id) = t["tableReference"]["tableId"].as_str() {
                    out.push((
                        id.to_string(),
                        t["type"].as_str().unwrap_or("TABLE").to_string(),
                    ));
                }
            }
            match body["nextPageToken"].as_str() {
                Some(token) if !token.is_empty() => page = Some(token.to_string()),
                _ => return Ok(out),
            }
        }
    }

    fn job_reference(&self, prefix: &str) -> Json {
        let mut r = json!({"projectId": self.project, "jobId": unique_id(prefix)});
        if let Some(location) = &self.location {
            r["location"] = json!(location);
        }
        r
    }

    /// Copies `source` over `dest` (WRITE_TRUNCATE) and waits for the job to finish.
    pub async fn copy_table(
        &self,
        dataset: &str,
        source: &str,
        dest: &str,
        deadline: tokio::time::Instant,
    ) -> Result<(), CallError> {
        let table_ref =
            |t: &str| json!({"projectId": self.project, "datasetId": dataset, "tableId": t});
        let body = json!({
            "jobReference": self.job_reference("slipstream_copy"),
            "configuration": {"copy": {
                "sourceTable": table_ref(source),
                "destinationTable": table_ref(dest),
                "writeDisposition": "WRITE_TRUNCATE",
                "createDisposition": "CREATE_IF_NEEDED",
            }},
        });
        let what = format!("copy {source} over {dest}");
        let mut job = self
            .call(reqwest::Method::POST, "/jobs", &[], Some(&body))
            .await
            .map_err(|e| e.context(&what))?;
        let mut pause = Duration::from_millis(100);
        loop {
            if job["status"]["state"].as_str() == Some("DONE") {
                let err = &job["status"]["errorResult"];
                if err.is_object() {
                    return Err(error::from_job_reason(
                        err["reason"].as_str().unwrap_or(""),
                        err["message"].as_str().unwrap_or(""),
                    )
                    .context(&what));
                }
                return Ok(());
            }
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(CallError::transient(format!(
                    "{what}: job still running at the deadline"
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
            let id = job["jobReference"]["jobId"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let mut query = Vec::new();
            if let Some(loc) = job["jobReference"]["location"].as_str() {
                query.push(("location", loc.to_string()));
            }
            job = self
                .call(reqwest::Method::GET, &format!("/jobs/{id}"), &query, None)
                .await
                .map_err(|e| e.context(&what))?;
        }
    }

    /// Runs a standard-SQL query and returns its rows as JSON objects keyed by column name.
    pub async fn query(
        &self,
        sql: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<Json>, CallError> {
        let mut body = json!({"query": sql, "useLegacySql": false, "timeoutMs": 10000});
        if let Some(location) = &self.location {
            body["location"] = json!(location);
        }
        let mut answer = self
            .call(reqwest::Method::POST, "/queries", &[], Some(&body))
            .await?;
        let mut rows = Vec::new();
        let mut fields: Option<Json> = None;
        loop {
            check_query_errors(&answer)?;
            let complete = answer["jobComplete"].as_bool().unwrap_or(true);
            if complete {
                if fields.is_none() {
                    fields = Some(answer["schema"]["fields"].clone());
                }
                let f = fields.as_ref().expect("set above");
                for row in answer["rows"].as_array().into_iter().flatten() {
                    rows.push(row_to_object(f, row));
                }
            }
            let token = answer["pageToken"].as_str().filter(|t| !t.is_empty());
            if complete && token.is_none() {
                return Ok(rows);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(CallError::transient("query still running at the deadline"));
            }
            let job = &answer["jobReference"];
            let id = job["jobId"].as_str().unwrap_or("").to_string();
            let mut query = vec![("timeoutMs", "10000".to_string())];
            if let Some(loc) = job["location"].as_str() {
                query.push(("location", loc.to_string()));
            }
            if let Some(token) = token {
                query.push(("pageToken", token.to_string()));
            }
            answer = self
                .call(
                    reqwest::Method::GET,
                    &format!("/queries/{id}"),
                    &query,
                    None,
                )
                .await?;
        }
    }
}

/// Query errors arrive as HTTP 200 with an `errors` list (DESIGN.md section 11), or in
/// `status.errorResult` on BigQuery.
fn check_query_errors(answer: &Json) -> Result<(), CallError> {
    let first = answer["errors"]
        .as_array()
        .and_then(|e| e.first())
        .or_else(|| {
            answer["status"]["errorResult"]
                .as_object()
                .map(|_| &answer["status"]["errorResult"])
        });
    match first {
        Some(e) => Err(error::from_job_reason(
            e["reason"].as_str().unwrap_or("error"),
            e["message"].as_str().unwrap_or(""),
        )
        .context("query")),
        None => Ok(()),
    }
}

/// Converts a `{"f": [{"v": ...}]}` row into an object keyed by column name, with INT64 as
/// numbers, FLOAT64 and NUMERIC as floats, BOOL as booleans, the rest as strings.
fn row_to_object(fields: &Json, row: &Json) -> Json {
    let mut obj = Map::new();
    let cells = row["f"].as_array().cloned().unwrap_or_default();
    for (i, field) in fields.as_array().into_iter().flatten().enumerate() {
        let name = field["name"].as_str().unwrap_or("").to_string();
        let v = cells.get(i).map(|c| c["v"].clone()).unwrap_or(Json::Null);
        let converted = match (&v, field["type"].as_str().unwrap_or("")) {
            (Json::String(s), "INTEGER" | "INT64") => {
                s.parse::<i64>().map(Json::from).unwrap_or(v.clone())
            }
            (Json::String(s), "FLOAT" | "FLOAT64" | "NUMERIC" | "BIGNUMERIC") => s
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Json::Number)
                .unwrap_or(v.clone()),
            (Json::String(s), "BOOLEAN" | "BOOL") => Json::Bool(s == "true"),
            _ => v,
        };
        obj.insert(name, converted);
    }
    Json::Object(obj)
}

/// A name unlikely to collide: a prefix, the time in nanoseconds and random bits.
pub fn unique_id(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}_{nanos:x}_{:08x}", rand::random::<u32>())
}

fn contains_null(v: &Json) -> bool {
    match v {
        Json::Null => true,
        Json::Array(a) => a.iter().any(contains_null),
        Json::Object(o) => o.values().any(contains_null),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_become_objects() {
        let fields = json!([
            {"name": "i", "type": "INTEGER"}, {"name": "n", "type": "NUMERIC"},
            {"name": "b", "type": "BOOLEAN"}, {"name": "d", "type": "DATE"},
            {"name": "z", "type": "STRING"}
        ]);
        let row = json!({"f": [{"v": "3"}, {"v": "0E-9"}, {"v": "false"}, {"v": "2026-11-01"}, {"v": null}]});
        assert_eq!(
            row_to_object(&fields, &row),
            json!({"i": 3, "n": 0.0, "b": false, "d": "2026-11-01", "z": null})
        );
    }

    #[test]
    fn query_errors_in_a_200() {
        let a = json!({"jobComplete": true, "errors": [{"reason": "notFound", "message": "Not found: Table p.d.t"}]});
        let e = check_query_errors(&a).unwrap_err();
        assert_eq!(e.class, error::Class::NotFound);
        assert!(e.detail.contains("Not found"));
        assert!(check_query_errors(&json!({"jobComplete": true, "rows": []})).is_ok());
    }
}
