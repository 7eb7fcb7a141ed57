//! The Storage Write API over gRPC: rows go into a PENDING stream, which is finalized and
//! committed with BatchCommitWriteStreams, so they appear all at once or not at all.

use std::sync::Arc;
use std::time::Duration;

use googleapis_tonic_google_cloud_bigquery_storage_v1::google::cloud::bigquery::storage::v1 as pb;
use pb::big_query_write_client::BigQueryWriteClient;
use prost_types::DescriptorProto;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::error::{self, CallError};
use super::Auth;

/// Largest AppendRows request we build; BigQuery refuses requests over 10 MB.
const MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;

/// A Storage Write client: one lazily connected channel that reconnects by itself.
pub struct Writer {
    channel: Channel,
    auth: Option<Arc<Auth>>,
    call_timeout: Duration,
}

/// Rows already encoded, cut into AppendRows requests.
pub struct EncodedRows {
    /// Each chunk is one request; the offset of a chunk is the number of rows before it.
    pub chunks: Vec<Vec<Vec<u8>>>,
    pub total: usize,
}

impl EncodedRows {
    /// Cuts rows into requests of at most `chunk_rows` rows and about 8 MB.
    pub fn new(rows: Vec<Vec<u8>>, chunk_rows: usize) -> Self {
        let total = rows.len();
        let mut chunks = Vec::new();
        let mut current = Vec::new();
        let mut bytes = 0;
        for row in rows {
            if !current.is_empty()
                && (current.len() >= chunk_rows.max(1) || bytes + row.len() + 8 > MAX_REQUEST_BYTES)
            {
                chunks.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes += row.len() + 8;
            current.push(row);
        }
        if !current.is_empty() {
            chunks.push(current);
        }
        EncodedRows { chunks, total }
    }
}

impl Writer {
    /// `url`: `http://host:port` (emulator, plain text) or `https://...` (TLS, native roots).
    /// Must be called inside a tokio runtime.
    pub fn new(url: &str, auth: Option<Arc<Auth>>, call_timeout: Duration) -> Result<Self, String> {
        let mut endpoint = Channel::from_shared(url.to_string())
            .map_err(|e| format!("bad gRPC URL {url:?}: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if url.starts_with("https://") {
            endpoint = endpoint
                .tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots())
                .map_err(|e| format!("TLS setup for {url}: {e}"))?;
        }
        Ok(Writer {
            channel: endpoint.connect_lazy(),
            auth,
            call_timeout,
        })
    }

    /// Wraps a message with the credentials and the routing header BigQuery expects.
    async fn request<T>(&self, msg: T, routing: &str) -> Result<tonic::Request<T>, CallError> {
        let mut req = tonic::Request::new(msg);
        if let Ok(v) = routing.parse() {
            req.metadata_mut().insert("x-goog-request-params", v);
        }
        if let Some(auth) = &self.auth {
            let token = auth.token().await?;
            let v = format!("Bearer {token}")
                .parse()
                .map_err(|_| CallError::permanent("access token is not a valid header value"))?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }

    /// Time left for one call: the per-call timeout, cut at the publication's deadline.
    fn budget(&self, deadline: Instant) -> Duration {
        deadline
            .saturating_duration_since(Instant::now())
            .min(self.call_timeout)
    }

    /// Writes `rows` into `table_path` (`projects/P/datasets/D/tables/T`) through one PENDING
    /// stream, then finalizes and commits it.
    pub async fn write_pending(
        &self,
        table_path: &str,
        descriptor: &DescriptorProto,
        rows: &EncodedRows,
        deadline: Instant,
    ) -> Result<(), CallError> {
        let mut client = BigQueryWriteClient::new(self.channel.clone());
        let routing = format!("parent={table_path}");

        let req = self
            .request(
                pb::CreateWriteStreamRequest {
                    parent: table_path.to_string(),
                    write_stream: Some(pb::WriteStream {
                        r#type: pb::write_stream::Type::Pending as i32,
                        ..Default::default()
                    }),
                },
                &routing,
            )
            .await?;
        let stream = timed(
            self.budget(deadline),
            "CreateWriteStream",
            client.create_write_stream(req),
        )
        .await?
        .into_inner();
        let name = stream.name;

        self.append(&mut client, &name, descriptor, rows, deadline)
            .await?;

        let req = self
            .request(
                pb::FinalizeWriteStreamRequest { name: name.clone() },
                &format!("name={name}"),
            )
            .await?;
        let finalized = timed(
            self.budget(deadline),
            "FinalizeWriteStream",
            client.finalize_write_stream(req),
        )
        .await?
        .into_inner();
        if finalized.row_count != rows.total as i64 {
            return Err(CallError::transient(format!(
                "FinalizeWriteStream counted {} rows, {} were appended",
                finalized.row_count, rows.total
            )));
        }

        let req = self
            .request(
                pb::BatchCommitWriteStreamsRequest {
                    parent: table_path.to_string(),
                    write_streams: vec![name.clone()],
                },
                &routing,
            )
            .await?;
        let committed = timed(
            self.budget(deadline),
            "BatchCommitWriteStreams",
            client.batch_commit_write_streams(req),
        )
        .await?
        .into_inner();
        if let Some(e) = committed.stream_errors.first() {
            return Err(CallError::permanent(format!(
                "BatchCommitWriteStreams: {} ({:?}) on {}",
                e.error_message,
                pb::storage_error::StorageErrorCode::try_from(e.code),
                e.entity
            )));
        }
        if committed.commit_time.is_none() {
            return Err(CallError::transient(
                "BatchCommitWriteStreams answered without a commit time",
            ));
        }
        Ok(())
    }

    /// Sends every chunk on one AppendRows connection with explicit offsets and waits for one
    /// answer per chunk. A repeated offset (ALREADY_EXISTS) counts as success.
    async fn append(
        &self,
        client: &mut BigQueryWriteClient<Channel>,
        stream: &str,
        descriptor: &DescriptorProto,
        rows: &EncodedRows,
        deadline: Instant,
    ) -> Result<(), CallError> {
        let mut requests = Vec::with_capacity(rows.chunks.len());
        let mut offset = 0i64;
        for chunk in &rows.chunks {
            requests.push(pb::AppendRowsRequest {
                write_stream: stream.to_string(),
                offset: Some(offset),
                rows: Some(pb::append_rows_request::Rows::ProtoRows(
                    pb::append_rows_request::ProtoData {
                        // Sent on every request: cheap, and robust to servers that want it each time.
                        writer_schema: Some(pb::ProtoSchema {
                            proto_descriptor: Some(descriptor.clone()),
                        }),
                        rows: Some(pb::ProtoRows {
                            serialized_rows: chunk.clone(),
                        }),
                    },
                )),
                ..Default::default()
            });
            offset += chunk.len() as i64;
        }
        let expected = requests.len();
        let req = self
            .request(
                tokio_stream::iter(requests),
                &format!("write_stream={stream}"),
            )
            .await?;
        let mut answers = timed(self.budget(deadline), "AppendRows", client.append_rows(req))
            .await?
            .into_inner();
        for i in 0..expected {
            let answer = match tokio::time::timeout(self.budget(deadline), answers.message()).await
            {
                Err(_) => {
                    return Err(CallError::transient(format!(
                        "AppendRows: no answer to request {} of {expected} within the call timeout",
                        i + 1
                    )))
                }
                Ok(Err(status)) => return Err(error::from_status(&status).context("AppendRows")),
                Ok(Ok(None)) => {
                    return Err(CallError::transient(format!(
                        "AppendRows: stream closed after {i} of {expected} answers"
                    )))
                }
                Ok(Ok(Some(a))) => a,
            };
            if let Some(e) = answer.row_errors.first() {
                return Err(CallError::permanent(format!(
                    "AppendRows rejected row {}: {}",
                    e.index, e.message
                )));
            }
            if let Some(pb::append_rows_response::Response::Error(status)) = &answer.response {
                let code = tonic::Code::from(status.code);
                if code != tonic::Code::AlreadyExists {
                    return Err(error::from_status(&tonic::Status::new(
                        code,
                        status.message.clone(),
                    ))
                    .context("AppendRows"));
                }
            }
        }
        Ok(())
    }
}

/// Awaits a unary gRPC call for at most `budget`.
async fn timed<T>(
    budget: Duration,
    what: &str,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(budget, call).await {
        Err(_) => Err(CallError::transient(format!(
            "{what}: timed out after {budget:?}"
        ))),
        Ok(Err(status)) => Err(error::from_status(&status).context(what)),
        Ok(Ok(v)) => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_by_rows() {
        let rows = vec![vec![0u8; 10]; 12];
        let e = EncodedRows::new(rows, 5);
        assert_eq!(e.total, 12);
        assert_eq!(
            e.chunks.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![5, 5, 2]
        );
        assert!(EncodedRows::new(Vec::new(), 5).chunks.is_empty());
    }

    #[test]
    fn chunks_by_bytes() {
        let rows = vec![vec![0u8; 3 * 1024 * 1024]; 5];
        let e = EncodedRows::new(rows, 5000);
        assert_eq!(
            e.chunks.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
    }
}
