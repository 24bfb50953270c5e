//! The workspace denies `unsafe` code (`Cargo.toml`), with one exception
//! allowed by name: AVX-512 VNNI's instruction behind its token in
//! `local-model/src/quant/vnni.rs`. A `deny` can be lifted by any file
//! with an `allow`; this test keeps that to the one place.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if p.is_dir() {
            if !matches!(name.as_ref(), "target" | ".tools" | ".git" | "node_modules") {
                rust_files(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

#[test]
fn unsafe_code_is_allowed_in_one_place_only() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    assert!(
        manifest.contains("unsafe_code = \"deny\"")
            || manifest.contains("unsafe_code = \"forbid\""),
        "the workspace no longer denies unsafe code"
    );
    let mut files = Vec::new();
    rust_files(root, &mut files);
    assert!(files.len() > 50, "found only {} Rust files", files.len());
    // The attribute, spelled so that this file does not match itself.
    let needle = format!("allow({})", "unsafe_code");
    let mut found: Vec<String> = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            if line.contains(&needle) {
                let rel = f.strip_prefix(root).unwrap_or(f);
                found.push(format!("{}:{}", rel.display(), i + 1));
            }
        }
    }
    assert_eq!(found.len(), 1, "unsafe code allowed at {found:?}");
    assert!(
        found[0].starts_with("local-model/src/quant/vnni.rs:"),
        "unsafe code allowed at {found:?}"
    );
}
