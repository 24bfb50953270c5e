//! Unit tests of the batch client's pure parts.
use super::*;

#[test]
fn ids_are_content_derived_and_validated() {
    assert_eq!(content_id(b"a"), content_id(b"a"));
    assert_ne!(content_id(b"a"), content_id(b"b"));
    assert!(validate_id(&content_id(b"x")).is_ok());
    assert!(validate_id("bad id").is_err());
    assert!(validate_id("a.b").is_err());
    assert!(validate_id("").is_err());
}

#[test]
fn summary_counts_and_estimates() {
    let mut meta = BatchMeta {
        id: "b".into(),
        total: 4,
        invalid: 0,
        created_ms: epoch_ms(SystemTime::now()) - 10_000,
        cancelled: false,
        submitted: 4,
        owner: None,
        token_hash: None,
    };
    let mut c = Counts {
        done: 1,
        failed: 1,
        cost_usd: 0.5,
        ..Counts::default()
    };
    let s = summarize(&meta, &c, 2);
    assert_eq!((s.done, s.failed, s.pending, s.cost_usd), (1, 1, 2, 0.5));
    assert_eq!(s.status, "running");
    let eta = s.eta_seconds.unwrap();
    assert!((9.0..12.0).contains(&eta), "{eta}");
    meta.submitted = 3;
    assert_eq!(summarize(&meta, &c, 2).status, "incomplete");
    meta.submitted = 4;
    c.done = 3;
    // Counts alone do not complete a batch while jobs of it are queued.
    assert_eq!(summarize(&meta, &c, 1).status, "running");
    let s = summarize(&meta, &c, 0);
    assert_eq!(s.status, "completed");
    assert!(s.finished());
    assert_eq!(s.eta_seconds, None);
    meta.cancelled = true;
    c.done = 1;
    let s = summarize(&meta, &c, 0);
    assert_eq!((s.status.as_str(), s.cancelled), ("cancelled", 2));
    assert!(s.finished());
}
