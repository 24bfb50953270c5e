//! Decoders under arbitrary input: every wire type, the NATS request
//! headers and the configuration loader take bytes from outside. Whatever
//! arrives, they answer with a value or an error, never a panic; and what
//! we encode decodes back to the same value, in both wire formats.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use optiroute_common::config::Config;
use optiroute_common::error::ErrorBody;
use optiroute_common::nats::RequestMeta;
use optiroute_common::wire::{
    self, CacheMatch, CacheMode, ChatMessage, Completion, Format, GenParams, GenerateRequest,
    GenerateResponse, Pool, ProviderChoice, ProviderReply, ProviderRequest, Role, StreamChunk,
    Usage,
};
use optiroute_common::ErrorKind;
use proptest::prelude::*;

const FORMATS: [Format; 2] = [Format::MsgPack, Format::Json];

/// Decodes `bytes` as every wire type a process reads from NATS or HTTP.
fn decode_every_type(format: Format, bytes: &[u8]) {
    let _ = wire::decode::<GenerateRequest>(format, bytes);
    let _ = wire::decode::<GenerateResponse>(format, bytes);
    let _ = wire::decode::<ProviderRequest>(format, bytes);
    let _ = wire::decode::<ProviderReply>(format, bytes);
    let _ = wire::decode::<StreamChunk>(format, bytes);
    let _ = wire::decode::<ErrorBody>(format, bytes);
}

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..24).prop_map(|c| c.into_iter().collect())
}

/// Finite floats: JSON has no NaN or infinity.
fn f32_finite() -> impl Strategy<Value = f32> {
    any::<f32>().prop_filter("finite", |f| f.is_finite())
}

fn f64_finite() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("finite", |f| f.is_finite())
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::System), Just(Role::User), Just(Role::Assistant)]
}

fn pool() -> impl Strategy<Value = Pool> {
    prop_oneof![Just(Pool::Local), Just(Pool::Cloud)]
}

fn usage() -> impl Strategy<Value = Usage> {
    (any::<u32>(), any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(p, c, t, estimated)| {
        Usage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: t,
            estimated,
        }
    })
}

prop_compose! {
    fn generate_request()(
        prompt in text(),
        messages in proptest::collection::vec((role(), text()), 0..4),
        stop in proptest::collection::vec(text(), 0..4),
        max_tokens in any::<u32>(),
        provider in prop_oneof![Just(ProviderChoice::Auto), Just(ProviderChoice::Local), Just(ProviderChoice::Cloud)],
        model_id in proptest::option::of(text()),
        temperature in proptest::option::of(f32_finite()),
        top_p in proptest::option::of(f32_finite()),
        cache in prop_oneof![Just(CacheMode::On), Just(CacheMode::Off), Just(CacheMode::ReadOnly), Just(CacheMode::WriteOnly)],
        route_bias in proptest::option::of(f32_finite()),
        semantic in proptest::option::of(any::<bool>()),
    ) -> GenerateRequest {
        GenerateRequest {
            params: GenParams {
                prompt,
                messages: messages.into_iter().map(|(role, content)| ChatMessage { role, content }).collect(),
                stop,
                max_tokens,
                model_id,
                temperature,
                top_p,
            },
            provider,
            cache,
            route_bias,
            user: None,
            cache_namespace: None,
            semantic,
        }
    }
}

prop_compose! {
    fn generate_response()(
        text in text(),
        usage in usage(),
        (cost, saved_usd) in (f64_finite(), proptest::option::of(f64_finite())),
        latency in f64_finite(),
        model in text(),
        routed_to in pool(),
        provider in pool(),
        cached in any::<bool>(),
        fallback_reason in proptest::option::of(proptest::sample::select(ErrorKind::ALL.to_vec())),
        route_reason in proptest::option::of(text()),
        request_id in proptest::option::of(text()),
        finish_reason in proptest::option::of(text()),
        (cache_match, similarity, semantic_miss) in (
            proptest::option::of(prop_oneof![Just(CacheMatch::Exact), Just(CacheMatch::Semantic)]),
            proptest::option::of(f64_finite()),
            proptest::option::of(text()),
        ),
    ) -> GenerateResponse {
        GenerateResponse {
            completion: Completion { text, usage, model, finish_reason },
            cost, latency, routed_to, provider, cached, saved_usd,
            fallback_reason, route_reason, request_id,
            cache_match, similarity, semantic_miss,
        }
    }
}

prop_compose! {
    fn provider_reply()(
        text in text(),
        usage in usage(),
        model in text(),
        cost_usd in f64_finite(),
        latency in f64_finite(),
        finish_reason in proptest::option::of(text()),
    ) -> ProviderReply {
        ProviderReply { completion: Completion { text, usage, model, finish_reason }, cost_usd, latency }
    }
}

fn round_trips<T>(value: &T) -> Result<(), TestCaseError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    for format in FORMATS {
        let bytes = wire::encode(format, value).unwrap();
        let back: T = wire::decode(format, &bytes)
            .map_err(|e| TestCaseError::fail(format!("{format:?}: {e}")))?;
        prop_assert_eq!(&back, value, "{:?}", format);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        for format in FORMATS {
            decode_every_type(format, &bytes);
        }
    }

    /// Valid encodings cut short or with one byte changed reach deeper
    /// into the decoders than random bytes do.
    #[test]
    fn damaged_valid_bodies_never_panic_a_decoder(
        req in generate_request(),
        resp in generate_response(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        for format in FORMATS {
            for body in [wire::encode(format, &req).unwrap(), wire::encode(format, &resp).unwrap()] {
                let mut body = body.to_vec();
                decode_every_type(format, &body[..cut.index(body.len() + 1)]);
                let i = flip.index(body.len());
                body[i] = byte;
                decode_every_type(format, &body);
            }
        }
    }

    /// JSON from outside: any JSON value in place of any field.
    #[test]
    fn arbitrary_json_never_panics_a_decoder(
        fields in proptest::collection::vec((
            prop_oneof![Just("prompt"), Just("messages"), Just("stop"), Just("max_tokens"),
                Just("provider"), Just("temperature"), Just("cache"), Just("route_bias"),
                Just("text"), Just("usage"), Just("cost"), Just("code"), Just("index"), Just("delta")],
            json_value(),
        ), 0..6)
    ) {
        let object: serde_json::Map<String, serde_json::Value> =
            fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let bytes = serde_json::to_vec(&object).unwrap();
        decode_every_type(Format::Json, &bytes);
    }

    #[test]
    fn generate_requests_round_trip(req in generate_request()) {
        round_trips(&req)?;
        round_trips(&ProviderRequest::from(&req))?;
    }

    #[test]
    fn answers_round_trip(resp in generate_response(), reply in provider_reply()) {
        round_trips(&resp)?;
        round_trips(&reply)?;
    }

    #[test]
    fn chunks_and_errors_round_trip(
        index in any::<u32>(),
        delta in text(),
        code in proptest::sample::select(ErrorKind::ALL.to_vec()),
        message in text(),
    ) {
        round_trips(&StreamChunk { index, delta })?;
        round_trips(&ErrorBody { code, message, param: None, retry_after_secs: None, charged: None })?;
    }

    #[test]
    fn arbitrary_request_headers_never_panic(
        id in proptest::option::of(text()),
        deadline in proptest::option::of(prop_oneof![text(), any::<u64>().prop_map(|n| n.to_string())]),
        inbox in proptest::option::of(text()),
    ) {
        let mut h = async_nats::HeaderMap::new();
        for (name, value) in [
            ("Optiroute-Request-Id", id),
            ("Optiroute-Deadline", deadline),
            (wire::STREAM_INBOX_HEADER, inbox),
        ] {
            // What arrives in a NATS header has no line breaks.
            if let Some(v) = value.filter(|v| !v.contains(['\r', '\n'])) {
                h.insert(name, v.as_str());
            }
        }
        if let Ok(meta) = RequestMeta::from_headers(Some(&h), Duration::from_secs(1)) {
            let _ = meta.headers(Format::MsgPack);
        }
    }

    /// Any text as the config file: a config or an error naming what is
    /// wrong, never a panic.
    #[test]
    fn arbitrary_config_text_never_panics(
        file in prop_oneof![
            any::<String>(),
            // Text that looks like our config, with arbitrary values.
            proptest::collection::vec((
                prop_oneof![Just("[ingress]"), Just("[router]"), Just("[cache]"), Just("[cloud.breaker]"),
                    Just("[nats]"), Just("[batch]"), Just("[local.simulated]"), Just("")],
                prop_oneof![Just("max_in_flight"), Just("listen"), Just("ttl_secs"), Just("open_ms"),
                    Just("prefix"), Just("backoff_ms"), Just("max_ms"), Just("max_streams")],
                prop_oneof![Just("0".to_string()), Just("-1".to_string()), Just("18446744073709551615".to_string()),
                    Just("1e400".to_string()), Just("[]".to_string()), Just("\"\"".to_string()), text()],
            ), 0..6).prop_map(|lines| lines.into_iter().map(|(s, k, v)| format!("{s}\n{k} = {v}\n")).collect()),
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &file).unwrap();
        if let Err(e) = Config::from_parts(Some(&path), &[], &[]) {
            prop_assert_eq!(e.kind, ErrorKind::BadRequest);
        }
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        f64_finite().prop_map(serde_json::Value::from),
        text().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(text(), inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}
