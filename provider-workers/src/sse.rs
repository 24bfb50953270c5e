//! Server-Sent Events framing of an upstream's streamed answer: bytes in,
//! in whatever pieces the network delivers them, `data:` payloads out.
//! Kept apart from the HTTP client so it can be tested on any chunking.

/// Longest line (one event's `data:`) an upstream may send. An OpenAI
/// chunk is a few hundred bytes; without a cap an upstream that never
/// sends a newline would grow the buffer until the deadline.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Splits a byte stream into lines and yields each `data:` payload,
/// trimmed; other lines (comments, `event:`, blank separators) are skipped.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    /// Where the next line starts in `buf`; consumed bytes are dropped
    /// lazily so a piece holding many lines is not shifted once per line.
    start: usize,
}

impl SseDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends what the network delivered.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete `data:` payload, `Ok(None)` when more bytes are
    /// needed, or an error when a line outgrows [`MAX_LINE_BYTES`].
    pub fn next_data(&mut self) -> Result<Option<String>, String> {
        loop {
            let rest = &self.buf[self.start..];
            let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                if rest.len() > MAX_LINE_BYTES {
                    return Err(format!(
                        "upstream stream line longer than {MAX_LINE_BYTES} bytes"
                    ));
                }
                return Ok(None);
            };
            let line = String::from_utf8_lossy(&rest[..nl]);
            let data = line
                .trim()
                .strip_prefix("data:")
                .map(|d| d.trim().to_string());
            self.start += nl + 1;
            if nl > MAX_LINE_BYTES {
                return Err(format!(
                    "upstream stream line longer than {MAX_LINE_BYTES} bytes"
                ));
            }
            if let Some(d) = data {
                return Ok(Some(d));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn decode_all(pieces: &[&[u8]]) -> Result<Vec<String>, String> {
        let mut d = SseDecoder::new();
        let mut out = Vec::new();
        for p in pieces {
            d.push(p);
            while let Some(data) = d.next_data()? {
                out.push(data);
            }
        }
        Ok(out)
    }

    /// What an OpenAI-compatible server sends: `data: <payload>` events
    /// separated by blank lines, sometimes with comments, `\r\n` endings
    /// or no space after the colon.
    fn frame(payloads: &[String], style: u8) -> Vec<u8> {
        let mut out = String::new();
        for (i, p) in payloads.iter().enumerate() {
            match (style + i as u8) % 3 {
                0 => out.push_str(&format!("data: {p}\n\n")),
                1 => out.push_str(&format!(": keep-alive\r\ndata:{p}\r\n\r\n")),
                _ => out.push_str(&format!("event: message\ndata:  {p}  \n\n")),
            }
        }
        out.into_bytes()
    }

    /// A payload as it would come: JSON text on one line (any Unicode).
    fn payload() -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>(), 0..16).prop_map(|c| {
            let s: String = c.into_iter().collect();
            serde_json::json!({"choices": [{"delta": {"content": s}}]}).to_string()
        })
    }

    #[test]
    fn a_line_without_end_is_refused_past_the_cap() {
        let mut d = SseDecoder::new();
        d.push(b"data: ");
        d.push(&vec![b'x'; MAX_LINE_BYTES]);
        assert!(d.next_data().is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_chunked_bytes_never_panic(
            pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)
        ) {
            let pieces: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
            let _ = decode_all(&pieces);
        }

        #[test]
        fn a_valid_stream_split_anywhere_decodes_the_same(
            payloads in proptest::collection::vec(payload(), 0..6),
            style in 0u8..3,
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let bytes = frame(&payloads, style);
            prop_assert_eq!(&decode_all(&[&bytes]).unwrap(), &payloads);
            // Cut in two at every boundary...
            for i in 0..=bytes.len() {
                let (a, b) = bytes.split_at(i);
                prop_assert_eq!(&decode_all(&[a, b]).unwrap(), &payloads);
            }
            // ...and into several pieces at random boundaries.
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            at.sort_unstable();
            let mut pieces = Vec::new();
            let mut from = 0;
            for c in at {
                pieces.push(&bytes[from..c]);
                from = c;
            }
            pieces.push(&bytes[from..]);
            prop_assert_eq!(&decode_all(&pieces).unwrap(), &payloads);
        }
    }
}
