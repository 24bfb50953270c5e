//! The embedder under arbitrary text: tokenizing never panics and always
//! gives `[CLS] … [SEP]` within the limit, and embedding gives a finite
//! unit vector.
#![allow(clippy::unwrap_used)]

mod common;

use common::embedder;
use optiroute_embed::MAX_TOKENS;
use proptest::prelude::*;

fn texts() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        // Words, punctuation, marks, controls and special tokens mixed.
        prop::collection::vec(
            prop_oneof![
                Just("word ".to_string()),
                Just("[MASK]".to_string()),
                Just("[SEP".to_string()),
                Just("é\u{301}".to_string()),
                Just("\u{0}\u{7}\u{200b}\u{ad}".to_string()),
                Just("日本".to_string()),
                Just("🍕".to_string()),
                "\\PC{1,8}",
            ],
            0..400,
        )
        .prop_map(|v| v.concat()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn any_text_tokenizes_within_the_limit(text in texts()) {
        let e = embedder();
        let ids = e.tokenize(&text);
        prop_assert!(ids.len() >= 2 && ids.len() <= MAX_TOKENS, "{}", ids.len());
        prop_assert_eq!(ids[0], 101);
        prop_assert_eq!(*ids.last().unwrap(), 102);
        let full = e.count_tokens(&text);
        prop_assert_eq!(ids.len(), full.min(MAX_TOKENS));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn any_text_embeds_to_a_unit_vector(text in texts()) {
        let v = embedder().embed(&text);
        prop_assert_eq!(v.len(), 384);
        prop_assert!(v.iter().all(|x| x.is_finite()));
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        prop_assert!((norm - 1.0).abs() < 1e-5, "{}", norm);
    }
}
