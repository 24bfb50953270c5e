//! Reading an upload as a stream, line by line, into a spool file on disk.
//!
//! Each non-blank line is parsed and checked as it arrives (its size, the
//! line count, the upload's size, its `custom_id`) and written to an
//! unnamed temporary file as a record: the job ready to publish, or the
//! line's error. Memory stays at one line whatever the upload's size; the
//! content hash (the batch id when none is given) is known at the end, so
//! nothing is published before the whole upload was read and found sound.

use std::io::SeekFrom;

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use optiroute_common::config::BatchConfig;
use optiroute_common::wire::{self, Format};
use optiroute_common::Error;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader, BufWriter};
use tokio_util::io::StreamReader;

use crate::model::{validate_custom_id, Job};

/// Why an upload was refused: the HTTP status differs.
#[derive(Debug)]
pub enum UploadError {
    /// A line, the line count or the upload is over its limit (413).
    TooLarge(String),
    /// The upload cannot be used as it is (400).
    Invalid(String),
    /// The spool file failed (500).
    Io(String),
}

impl UploadError {
    pub fn into_error(self) -> Error {
        match self {
            UploadError::TooLarge(m) | UploadError::Invalid(m) => Error::bad_request(m),
            UploadError::Io(m) => Error::internal(m),
        }
    }
}

/// One spooled line.
pub enum Record {
    /// A job, encoded as it is published.
    Job { line: u64, body: Bytes },
    /// A line that is not a valid job: its error result is stored instead.
    Invalid { line: u64, error: Error },
}

/// An upload read whole, on disk.
pub struct Spool {
    file: BufReader<tokio::fs::File>,
    /// The batch id this content gets when none is given.
    pub content_id: String,
    /// Non-blank lines.
    pub total: u64,
    pub invalid: u64,
}

fn io(e: std::io::Error) -> UploadError {
    UploadError::Io(format!("batch spool: {e}"))
}

const JOB: u8 = 0;
const INVALID: u8 = 1;

/// Reads `body` into a spool; see the module's description.
pub async fn spool<S, E>(
    body: S,
    cfg: &BatchConfig,
    max_prompt_bytes: usize,
) -> Result<Spool, UploadError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut hash = Sha256::new();
    let mut read_bytes = 0u64;
    let body = body.map_err(|e| std::io::Error::other(format!("cannot read the body: {e}")));
    let mut reader = StreamReader::new(body);
    let file = tokio::fs::File::from_std(tempfile::tempfile().map_err(io)?);
    let mut out = BufWriter::new(file);
    let mut buf = Vec::with_capacity(4096);
    let (mut total, mut invalid, mut raw_line) = (0u64, 0u64, 0u64);
    loop {
        buf.clear();
        let limit = cfg.max_line_bytes as u64 + 2; // the line, "\r\n"
        let n = (&mut reader)
            .take(limit)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| UploadError::Invalid(e.to_string()))?;
        if n == 0 {
            break;
        }
        raw_line += 1;
        read_bytes += n as u64;
        if read_bytes > cfg.max_upload_bytes {
            return Err(UploadError::TooLarge(format!(
                "the upload is over the limit of {} bytes",
                cfg.max_upload_bytes
            )));
        }
        hash.update(&buf);
        let text = trim_end(&buf);
        if text.len() > cfg.max_line_bytes {
            return Err(UploadError::TooLarge(format!(
                "input line {raw_line} is over the limit of {} bytes",
                cfg.max_line_bytes
            )));
        }
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        total += 1;
        if total > cfg.max_lines as u64 {
            return Err(UploadError::TooLarge(format!(
                "the upload has more than {} lines (the limit)",
                cfg.max_lines
            )));
        }
        let line = total;
        let parsed = Job::decode(Format::Json, text)
            .and_then(|j| j.request.validate(max_prompt_bytes).map(|_| j));
        let (tag, body) = match parsed {
            Ok(j) => {
                validate_custom_id(j.custom_id.as_deref())
                    .map_err(|e| UploadError::Invalid(format!("line {line}: {}", e.message)))?;
                let job = Job { line, ..j };
                let body =
                    wire::encode(Format::MsgPack, &job).map_err(|e| UploadError::Io(e.message))?;
                (JOB, body)
            }
            Err(e) => {
                invalid += 1;
                (INVALID, Bytes::from(e.message.into_bytes()))
            }
        };
        out.write_u8(tag).await.map_err(io)?;
        out.write_u64_le(line).await.map_err(io)?;
        out.write_u32_le(body.len() as u32).await.map_err(io)?;
        out.write_all(&body).await.map_err(io)?;
    }
    if total == 0 {
        return Err(UploadError::Invalid("the input has no lines".into()));
    }
    out.flush().await.map_err(io)?;
    let mut file = out.into_inner();
    file.seek(SeekFrom::Start(0)).await.map_err(io)?;
    Ok(Spool {
        file: BufReader::new(file),
        content_id: format!("b{}", &hex::encode(hash.finalize())[..20]),
        total,
        invalid,
    })
}

fn trim_end(mut b: &[u8]) -> &[u8] {
    while let [rest @ .., b'\n' | b'\r'] = b {
        b = rest;
    }
    b
}

impl Spool {
    /// The next record, in input order; `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Record>, Error> {
        let err = |e: std::io::Error| Error::internal(format!("batch spool: {e}"));
        let tag = match self.file.read_u8().await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(err(e)),
        };
        let line = self.file.read_u64_le().await.map_err(err)?;
        let len = self.file.read_u32_le().await.map_err(err)? as usize;
        let mut body = vec![0u8; len];
        self.file.read_exact(&mut body).await.map_err(err)?;
        Ok(Some(if tag == JOB {
            Record::Job {
                line,
                body: Bytes::from(body),
            }
        } else {
            Record::Invalid {
                line,
                error: Error::bad_request(String::from_utf8_lossy(&body).into_owned()),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(
        chunks: &[&str],
    ) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Unpin {
        let chunks: Vec<_> = chunks
            .iter()
            .map(|c| Ok(Bytes::copy_from_slice(c.as_bytes())))
            .collect();
        futures::stream::iter(chunks)
    }

    #[tokio::test]
    async fn lines_split_across_chunks_are_spooled_in_order() {
        let cfg = BatchConfig::default();
        let input =
            "{\"prompt\": \"a\", \"custom_id\": \"x\"}\r\n\n  \n{\"prompt\": \"\"}\n{\"prom";
        let rest = "pt\": \"c\"}";
        let mut s = spool(body(&[input, rest]), &cfg, 1000).await.unwrap();
        assert_eq!((s.total, s.invalid), (3, 1));
        let whole = format!("{input}{rest}");
        assert_eq!(s.content_id, crate::client::content_id(whole.as_bytes()));
        let mut seen = Vec::new();
        while let Some(r) = s.next().await.unwrap() {
            seen.push(match r {
                Record::Job { line, body } => {
                    let j = Job::decode(Format::MsgPack, &body).unwrap();
                    assert_eq!(j.line, line);
                    format!("{line}:{}", j.request.prompt)
                }
                Record::Invalid { line, .. } => format!("{line}:invalid"),
            });
        }
        assert_eq!(seen, ["1:a", "2:invalid", "3:c"]);
    }

    #[tokio::test]
    async fn limits_are_named() {
        let cfg = BatchConfig {
            max_line_bytes: 20,
            max_lines: 2,
            ..BatchConfig::default()
        };
        let long = format!("{{\"prompt\": \"{}\"}}\n", "x".repeat(30));
        match spool(body(&["{\"prompt\": \"a\"}\n", &long]), &cfg, 1000).await {
            Err(UploadError::TooLarge(m)) => assert!(m.contains("line 2"), "{m}"),
            other => panic!("{:?}", other.err()),
        }
        let three = "{\"prompt\": \"a\"}\n".repeat(3);
        match spool(body(&[&three]), &cfg, 1000).await {
            Err(UploadError::TooLarge(m)) => assert!(m.contains("2 lines"), "{m}"),
            other => panic!("{:?}", other.err()),
        }
        match spool(body(&["\n \n"]), &cfg, 1000).await {
            Err(UploadError::Invalid(m)) => assert!(m.contains("no lines"), "{m}"),
            other => panic!("{:?}", other.err()),
        }
    }
}
