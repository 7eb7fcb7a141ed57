//! Replaying an NDJSON event file through the pipeline.
//!
//! The file is one source with one partition; its "offset" is the byte position after
//! the last folded line, stored in the same atomic batch as the state. Replaying the
//! same file into the same data directory again resumes after the last durable batch.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;

use crate::event::{decode_json, Kind, Reject, RejectReason};
use crate::pipeline::{Pipeline, PublishReport};

/// Outcome of a replay, for the summary printed at the end.
#[derive(Debug, Default)]
pub struct ReplaySummary {
    pub lines: u64,
    pub folded: u64,
    pub rejected: u64,
    pub resumed_at: u64,
    pub published: PublishReport,
}

/// The source name under which a file's offsets are stored.
pub fn source_name(input: &Path) -> String {
    let abs = std::fs::canonicalize(input).unwrap_or_else(|_| input.to_path_buf());
    format!("file:{}", abs.display())
}

/// Reads one line of at most `max` bytes into `buf` (without the newline). Longer lines
/// are consumed to their end but not kept: returns (bytes consumed, whether it fit).
pub fn read_line_bounded(
    r: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<(usize, bool)> {
    buf.clear();
    let (mut consumed, mut fits) = (0, true);
    loop {
        let chunk = r.fill_buf()?;
        if chunk.is_empty() {
            return Ok((consumed, fits));
        }
        let (take, done) = match memchr(chunk) {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let body = if done {
            &chunk[..take - 1]
        } else {
            &chunk[..take]
        };
        if fits && buf.len() + body.len() <= max {
            buf.extend_from_slice(body);
        } else {
            fits = false;
            buf.clear();
        }
        r.consume(take);
        consumed += take;
        if done {
            return Ok((consumed, fits));
        }
    }
}

fn memchr(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// Folds every line of `input` after the stored offset, publishing windows as they
/// complete. At the end everything is flushed and due windows are published.
pub fn replay(pipeline: &mut Pipeline, input: &Path) -> anyhow::Result<ReplaySummary> {
    let source = source_name(input);
    pipeline.fold.start_compactor();
    let mut file = File::open(input)
        .map_err(|e| anyhow::anyhow!("cannot open input {}: {e}", input.display()))?;
    let start = pipeline
        .fold
        .store()
        .offsets(&source)?
        .get(&0)
        .copied()
        .unwrap_or(0) as u64;
    let len = file.metadata()?.len();
    if start > len {
        anyhow::bail!("{} is shorter ({len} bytes) than the stored replay offset {start}: was it replaced? Use a fresh --data-dir", input.display());
    }
    file.seek(SeekFrom::Start(start))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let max = pipeline.fold.config().pipeline.max_message_bytes;
    let batch = pipeline.fold.config().pipeline.batch_events;
    let mut summary = ReplaySummary {
        resumed_at: start,
        ..Default::default()
    };
    let mut pos = start;
    let mut buf = Vec::with_capacity(4096);
    loop {
        let (n, fits) = read_line_bounded(&mut reader, &mut buf, max)?;
        if n == 0 {
            break;
        }
        pos += n as u64;
        if fits && buf.iter().all(|c| c.is_ascii_whitespace()) {
            pipeline.fold.record_offset(&source, 0, pos as i64);
            continue;
        }
        summary.lines += 1;
        if !fits {
            let r = Reject {
                reason: RejectReason::Oversized,
                detail: format!("line longer than {max} bytes"),
            };
            pipeline.fold.reject(&r, &source);
        } else {
            match decode_json(&buf, Kind::Any, max) {
                Ok(ev) => {
                    pipeline.fold.apply(&source, 0, &ev);
                }
                Err(r) => pipeline.fold.reject(&r, &source),
            }
        }
        pipeline.fold.record_offset(&source, 0, pos as i64);
        if pipeline.fold.pending_events() >= batch {
            let wm = pipeline.fold.watermark(None);
            let r = pipeline.flush_and_publish(wm, false)?;
            summary.published.absorb(r);
        }
    }
    let wm = pipeline.fold.watermark(None);
    // The last pass measures every window late data touched, however recently measured.
    pipeline.late_check_interval = std::time::Duration::ZERO;
    let r = pipeline.flush_and_publish(wm, false)?;
    summary.published.absorb(r);
    pipeline.compact()?; // leave the state at rest merged
    pipeline.fold.store().flush()?;
    summary.folded = pipeline.fold.stats.folded;
    summary.rejected = pipeline.fold.stats.rejected.iter().sum();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_lines() {
        let data = b"short\nthis line is too long\n\nlast";
        let mut r = BufReader::with_capacity(4, &data[..]);
        let mut buf = Vec::new();
        assert_eq!(read_line_bounded(&mut r, &mut buf, 10).unwrap(), (6, true));
        assert_eq!(buf, b"short");
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 10).unwrap(),
            (22, false)
        );
        assert!(buf.is_empty());
        assert_eq!(read_line_bounded(&mut r, &mut buf, 10).unwrap(), (1, true));
        assert_eq!(read_line_bounded(&mut r, &mut buf, 10).unwrap(), (4, true));
        assert_eq!(buf, b"last");
        assert_eq!(read_line_bounded(&mut r, &mut buf, 10).unwrap(), (0, true));
    }
}
