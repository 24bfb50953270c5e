//! Batch decoders under arbitrary input: an uploaded line or a job that a
//! direct publisher put on `optiroute.batch.<id>` (JSON or MessagePack),
//! and the batch records read back from KV. Any bytes give a value or an
//! error, never a panic. (The upload parser itself is being rewritten to
//! stream; its line type has the shape of [`Job`], decoded here.)
#![allow(clippy::unwrap_used)]

use optiroute_batch::{BatchMeta, BatchResult, Job};
use optiroute_common::wire::{self, Format, GenerateRequest};
use proptest::prelude::*;

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
}
