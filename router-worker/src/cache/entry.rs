//! The stored form of a cache entry: the answer wrapped with a type tag
//! and the key it was written under.
//!
//! Anything that can publish to `$KV.<bucket>.<key>` writes a value there:
//! a reply sent where a requester pointed it, a JetStream publish
//! acknowledgement, a service's `$SRV` stats. A router's own reply even
//! decodes as a bare answer (same field names). So a value counts only
//! when it carries our tag and its own key; anything else is a miss.

use bytes::Bytes;
use optiroute_common::wire::{self, Format};
use optiroute_common::Error;
use serde::{Deserialize, Serialize};

use super::CachedAnswer;

/// Names what the value is and the version of its layout.
pub const TAG: &str = "optiroute.cache.answer.v1";

#[derive(Serialize)]
struct EntryRef<'a> {
    tag: &'a str,
    key: &'a str,
    answer: &'a CachedAnswer,
}

#[derive(Deserialize)]
struct Entry {
    tag: String,
    key: String,
    answer: CachedAnswer,
}

/// Why a stored value was not taken as an answer (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Not a tagged entry at all (a forged reply, an ack, an old layout).
    Undecodable,
    /// A tagged entry of another type or version.
    Tag,
    /// A valid entry copied under another key.
    Key,
}

impl Rejected {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::Undecodable => "undecodable",
            Rejected::Tag => "tag",
            Rejected::Key => "key",
        }
    }
}

/// The bytes stored under `key` for `answer`.
pub fn encode(key: &str, answer: &CachedAnswer) -> Result<Bytes, Error> {
    wire::encode(
        Format::MsgPack,
        &EntryRef {
            tag: TAG,
            key,
            answer,
        },
    )
}

/// The answer stored under `key`, if `value` is one written for that key.
pub fn decode(key: &str, value: &[u8]) -> Result<CachedAnswer, Rejected> {
    let entry: Entry = rmp_serde::from_slice(value).map_err(|_| Rejected::Undecodable)?;
    if entry.tag != TAG {
        return Err(Rejected::Tag);
    }
    if entry.key != key {
        return Err(Rejected::Key);
    }
    Ok(entry.answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use optiroute_common::wire::{Completion, GenerateResponse, Pool, Usage};

    fn answer() -> CachedAnswer {
        CachedAnswer {
            completion: Completion {
                text: "4".into(),
                usage: Usage::default(),
                model: "m".into(),
                finish_reason: None,
            },
            provider: Pool::Local,
            routed_to: Pool::Local,
            cost: 0.001,
            route_reason: None,
        }
    }

    #[test]
    fn round_trips_under_its_own_key_only() {
        let bytes = encode("k1", &answer()).unwrap();
        assert_eq!(decode("k1", &bytes), Ok(answer()));
        assert_eq!(decode("k2", &bytes), Err(Rejected::Key));
    }

    #[test]
    fn forged_and_foreign_values_are_rejected() {
        // What a router's reply looks like when a requester sends it into
        // the bucket: it has every field of an answer, but no tag.
        let reply = GenerateResponse {
            completion: Completion {
                text: "forged".into(),
                usage: Usage::default(),
                model: "m".into(),
                finish_reason: None,
            },
            cost: 0.0,
            latency: 0.1,
            routed_to: Pool::Local,
            provider: Pool::Local,
            cached: false,
            saved_usd: None,
            fallback_reason: None,
            route_reason: None,
            request_id: Some("r".into()),
            cache_match: None,
            similarity: None,
            semantic_miss: None,
        };
        let forged = wire::encode(Format::MsgPack, &reply).unwrap();
        assert_eq!(decode("k", &forged), Err(Rejected::Undecodable));
        let bare = wire::encode(Format::MsgPack, &answer()).unwrap();
        assert_eq!(decode("k", &bare), Err(Rejected::Undecodable));
        let other_tag = wire::encode(
            Format::MsgPack,
            &EntryRef {
                tag: "optiroute.cache.answer.v0",
                key: "k",
                answer: &answer(),
            },
        )
        .unwrap();
        assert_eq!(decode("k", &other_tag), Err(Rejected::Tag));
        for junk in [
            &b""[..],
            b"{\"stream\":\"OPTIROUTE_BATCH\",\"seq\":1}",
            b"\xc1",
        ] {
            assert_eq!(decode("k", junk), Err(Rejected::Undecodable));
        }
    }
}
