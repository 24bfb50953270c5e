//! The tokenizer under arbitrary text: encoding never panics, decoding
//! any ids never panics, and decoding what was encoded gives the text
//! back. Needs the model file (`scripts/fetch-model.sh`); without it the
//! tests say so and pass, as the file is fetched only on request.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::OnceLock;

use optiroute_local_model::{ChatTokenizer, EmbeddedModel, Role, Turn, DEFAULT_MODEL_PATH};
use proptest::prelude::*;

fn tokenizer() -> Option<&'static ChatTokenizer> {
    static MODEL: OnceLock<Option<EmbeddedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(DEFAULT_MODEL_PATH);
            if !path.is_file() {
                println!(
                    "skipped: {} is missing (run scripts/fetch-model.sh)",
                    path.display()
                );
                return None;
            }
            Some(EmbeddedModel::load(&path).unwrap())
        })
        .as_ref()
        .map(EmbeddedModel::tokenizer)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_text_encodes_and_decodes_back(text in any::<String>()) {
        let Some(tok) = tokenizer() else { return Ok(()) };
        let ids = tok.encode_plain(&text).unwrap();
        prop_assert_eq!(tok.decode(&ids), text.clone());
        // With special tokens parsed, encoding still answers.
        let _ = tok.encode(&text);
        let _ = tok.chat_prompt(&[Turn::new(Role::User, &text)]).unwrap();
    }

    #[test]
    fn plain_text_round_trips(text in "[ -~\\n\\tàéüßçñ€中文😀]{0,200}") {
        let Some(tok) = tokenizer() else { return Ok(()) };
        let ids = tok.encode_plain(&text).unwrap();
        prop_assert_eq!(tok.decode(&ids), text);
    }

    #[test]
    fn any_ids_decode_without_panic(ids in proptest::collection::vec(any::<u32>(), 0..64)) {
        let Some(tok) = tokenizer() else { return Ok(()) };
        let _ = tok.decode(&ids);
        for id in ids {
            let _ = tok.token(id);
            let _ = tok.token_bytes(id);
        }
    }
}
