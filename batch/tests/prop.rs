//! Batch decoders under arbitrary input: an uploaded line or a job that a
//! direct publisher put on `optiroute.batch.<id>` (JSON or MessagePack),
//! and the batch records read back from KV. Any bytes give a value or an
//! error, never a panic. The streaming upload parser (`upload::spool`)
//! gets any bytes cut into any chunks: a spool or an error, never a panic,
//! and the same result wherever the chunks were cut.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use optiroute_batch::upload::{self, Record};
use optiroute_batch::{BatchMeta, BatchResult, Job};
use optiroute_common::config::BatchConfig;
use optiroute_common::wire::{self, Format, GenerateRequest};
use proptest::prelude::*;

/// A spool's id, its total and invalid counts, and its records (`Ok` job
/// bodies or error messages).
type Spooled = (String, u64, u64, Vec<Result<Bytes, String>>);

/// What a spool of `input` cut at `cuts` holds, or the refusal's message.
fn spool(input: &[u8], cuts: &[usize]) -> Result<Spooled, String> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(0);
    points.push(input.len());
    points.sort_unstable();
    points.dedup();
    let chunks: Vec<Result<Bytes, std::convert::Infallible>> = points
        .windows(2)
        .map(|w| Ok(Bytes::copy_from_slice(&input[w[0]..w[1]])))
        .collect();
    let cfg = BatchConfig {
        max_lines: 8,
        max_line_bytes: 200,
        max_upload_bytes: 1200,
        ..BatchConfig::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut s = upload::spool(futures::stream::iter(chunks), &cfg, 100)
            .await
            .map_err(|e| e.into_error().message)?;
        let mut records = Vec::new();
        while let Some(r) = s.next().await.map_err(|e| e.message)? {
            records.push(match r {
                Record::Job { body, .. } => Ok(body),
                Record::Invalid { error, .. } => Err(error.message),
            });
        }
        Ok((s.content_id.clone(), s.total, s.invalid, records))
    })
}

/// Lines that are jobs, broken jobs, blank, CRLF-ended or too long.
fn upload_line() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z ]{0,40}".prop_map(|p| format!("{{\"prompt\": \"{p}\"}}")),
        "[a-z]{0,8}".prop_map(|id| format!("{{\"custom_id\": \"{id}\", \"prompt\": \"x\"}}")),
        "\\PC{0,30}",
        Just(String::new()),
        Just("   ".to_string()),
        "[a-z]{190,230}".prop_map(|p| format!("{{\"prompt\": \"{p}\"}}")),
    ]
}

fn decode_all(format: Format, bytes: &[u8]) {
    let _ = Job::decode(format, bytes);
    let _ = wire::decode::<BatchMeta>(format, bytes);
    let _ = wire::decode::<BatchResult>(format, bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_lines_never_panic(line in any::<String>()) {
        decode_all(Format::Json, line.as_bytes());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        decode_all(Format::Json, &bytes);
        decode_all(Format::MsgPack, &bytes);
    }

    /// A job as a line of JSON, with `custom_id` and extra fields in any
    /// order, decodes to what was written.
    #[test]
    fn job_lines_round_trip(
        line in any::<u64>(),
        custom_id in proptest::option::of(any::<String>()),
        prompt in any::<String>(),
        max_tokens in any::<u32>(),
    ) {
        let mut request = GenerateRequest::new(prompt);
        request.params.max_tokens = max_tokens;
        let job = Job { line, custom_id, request };
        for format in [Format::Json, Format::MsgPack] {
            let bytes = wire::encode(format, &job).unwrap();
            let back = Job::decode(format, &bytes).unwrap();
            prop_assert_eq!(&back, &job);
        }
    }

    /// Any bytes, cut anywhere: a spool or a refusal, never a panic; the
    /// result does not depend on the cuts.
    #[test]
    fn any_upload_cut_anywhere_spools_the_same(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        prop_assert_eq!(spool(&bytes, &cuts), spool(&bytes, &[]));
    }

    /// Uploads of plausible lines: the same spool wherever the chunks are
    /// cut, a record per non-blank line in order, the counts agreeing.
    #[test]
    fn upload_lines_spool_in_order(
        lines in proptest::collection::vec(upload_line(), 0..10),
        crlf in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let input = lines.join(if crlf { "\r\n" } else { "\n" });
        let whole = spool(input.as_bytes(), &[]);
        prop_assert_eq!(&spool(input.as_bytes(), &cuts), &whole);
        if let Ok((_, total, invalid, records)) = whole {
            prop_assert_eq!(records.len() as u64, total);
            prop_assert_eq!(records.iter().filter(|r| r.is_err()).count() as u64, invalid);
            for (i, r) in records.iter().enumerate() {
                if let Ok(body) = r {
                    let job = Job::decode(Format::MsgPack, body).unwrap();
                    prop_assert_eq!(job.line, i as u64 + 1);
                }
            }
        }
    }
}
