//! Continuous batching with the real model file: batched and alone give the
//! same greedy tokens, a sequence that is cancelled or expires mid-batch
//! leaves the others untouched, a long prompt joins in chunks without
//! stalling the others, the caps queue or refuse, and the engine thread
//! serves concurrent submissions and reports its load.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use optiroute_local_model::{
    BatchEngine, Completion, EmbeddedModel, GenerateError, GenerateParams, OnText, Progress,
    SchedulerConfig, Turn, DEFAULT_MODEL_PATH,
};

fn model_path() -> PathBuf {
    static FETCHED: OnceLock<PathBuf> = OnceLock::new();
    FETCHED
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let out = std::process::Command::new("bash")
                .arg(root.join("scripts/fetch-model.sh"))
                .output()
                .unwrap();
            assert!(out.status.success());
            root.join(DEFAULT_MODEL_PATH)
        })
        .clone()
}

fn model() -> &'static EmbeddedModel {
    static MODEL: OnceLock<EmbeddedModel> = OnceLock::new();
    MODEL.get_or_init(|| EmbeddedModel::load(&model_path()).unwrap())
}

fn ids(question: &str) -> Vec<u32> {
    model()
        .tokenizer()
        .chat_prompt(&[Turn::user(question)])
        .unwrap()
}

fn greedy(max_tokens: u32) -> GenerateParams {
    GenerateParams {
        max_tokens,
        ..GenerateParams::default()
    }
}

const QUESTIONS: [&str; 4] = [
    "What is the capital of France?",
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works, step by step.",
    "List three colours.",
];

fn alone(question: &str, max_tokens: u32) -> String {
    model()
        .generate(&[Turn::user(question)], &greedy(max_tokens), &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap()
        .text
}

fn cfg() -> SchedulerConfig {
    SchedulerConfig {
        max_active: 16,
        max_queue: 16,
        max_kv_bytes: 1 << 30,
        prefill_chunk: 32,
        threads: 2,
    }
}

type Ended = Vec<(u64, Result<Completion, GenerateError>)>;

/// Steps until every listed sequence has ended (some maybe in `early`
/// steps already); returns their results in the order of `ids`.
fn run_all(
    sched: &mut optiroute_local_model::Scheduler<'_>,
    ids: &[u64],
    early: Ended,
) -> Vec<Result<Completion, GenerateError>> {
    let mut results: Vec<Option<Result<Completion, GenerateError>>> =
        ids.iter().map(|_| None).collect();
    let mut ended = early;
    for _ in 0..10_000 {
        ended.extend(sched.step());
        for (id, r) in ended.drain(..) {
            if let Some(i) = ids.iter().position(|x| *x == id) {
                results[i] = Some(r);
            }
        }
        if results.iter().all(Option::is_some) {
            return results.into_iter().map(Option::unwrap).collect();
        }
    }
    panic!("the sequences never ended");
}

#[test]
fn batched_and_alone_give_the_same_greedy_tokens() {
    let want: Vec<String> = QUESTIONS.iter().map(|q| alone(q, 40)).collect();
    // Pinned: the answer itself, not only its agreement with the batch.
    assert!(want[0].contains("Paris"), "{:?}", want[0]);

    // All four together, prompts read in 32-token chunks alongside the
    // others' decoding; and one joining late, mid-batch.
    let mut sched = model().scheduler(cfg());
    let mut seqs: Vec<u64> = QUESTIONS[..3]
        .iter()
        .map(|q| {
            sched
                .submit(ids(q), greedy(40), Box::new(|_| ControlFlow::Continue(())))
                .unwrap()
        })
        .collect();
    let mut early = Ended::new();
    for _ in 0..7 {
        early.extend(sched.step());
    }
    seqs.push(
        sched
            .submit(
                ids(QUESTIONS[3]),
                greedy(40),
                Box::new(|_| ControlFlow::Continue(())),
            )
            .unwrap(),
    );
    let got: Vec<String> = run_all(&mut sched, &seqs, early)
        .into_iter()
        .map(|r| r.unwrap().text)
        .collect();
    assert_eq!(got, want);

    // One thread or two: the same tokens.
    let mut one = model().scheduler(SchedulerConfig {
        threads: 1,
        ..cfg()
    });
    let id = one
        .submit(
            ids(QUESTIONS[1]),
            greedy(40),
            Box::new(|_| ControlFlow::Continue(())),
        )
        .unwrap();
    assert_eq!(
        run_all(&mut one, &[id], Ended::new())[0]
            .as_ref()
            .unwrap()
            .text,
        want[1]
    );
}

#[test]
fn a_sequence_cancelled_or_expired_mid_batch_leaves_the_others_untouched() {
    let want_a = alone(QUESTIONS[1], 48);
    let want_d = alone(QUESTIONS[2], 48);
    let mut sched = model().scheduler(cfg());
    let on = || -> OnText<'static> { Box::new(|_| ControlFlow::Continue(())) };
    let a = sched.submit(ids(QUESTIONS[1]), greedy(48), on()).unwrap();
    let cancel = Arc::new(AtomicBool::new(false));
    let b = sched
        .submit(
            ids(QUESTIONS[3]),
            GenerateParams {
                cancel: Some(Arc::clone(&cancel)),
                ..greedy(200)
            },
            on(),
        )
        .unwrap();
    // Stops itself from its text callback after a few pieces.
    let mut pieces = 0;
    let c = sched
        .submit(
            ids(QUESTIONS[0]),
            greedy(200),
            Box::new(move |_| {
                pieces += 1;
                if pieces == 4 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            }),
        )
        .unwrap();
    let e = sched
        .submit(
            ids("Write a long story about the sea."),
            GenerateParams {
                deadline: Some(Instant::now() + Duration::from_millis(400)),
                ..greedy(2000)
            },
            on(),
        )
        .unwrap();
    let d = sched.submit(ids(QUESTIONS[2]), greedy(48), on()).unwrap();
    // Until B is decoding, then cancel it.
    let mut early = Ended::new();
    for _ in 0..1000 {
        if matches!(sched.progress(b), Progress::Active { generated, .. } if generated >= 3) {
            break;
        }
        early.extend(sched.step());
    }
    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    let r = run_all(&mut sched, &[a, b, c, d, e], early);
    assert_eq!(r[0].as_ref().unwrap().text, want_a);
    assert!(matches!(r[1], Err(GenerateError::Cancelled)), "{:?}", r[1]);
    assert!(matches!(r[2], Err(GenerateError::Cancelled)), "{:?}", r[2]);
    assert_eq!(r[3].as_ref().unwrap().text, want_d);
    assert!(
        matches!(r[4], Err(GenerateError::DeadlineExceeded { .. })),
        "{:?}",
        r[4]
    );
    assert_eq!(sched.load().kv_bytes, 0, "every cache was freed");
    assert!(sched.is_idle());
}

#[test]
fn a_long_prompt_joins_in_chunks_without_stalling_the_others() {
    let chunk = 32;
    let mut sched = model().scheduler(cfg());
    let a = sched
        .submit(
            ids(QUESTIONS[1]),
            greedy(200),
            Box::new(|_| ControlFlow::Continue(())),
        )
        .unwrap();
    while !matches!(sched.progress(a), Progress::Active { generated, .. } if generated >= 2) {
        assert!(sched.step().is_empty());
    }
    let long_text = "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(24);
    let long = ids(&format!("Summarise this: {long_text}"));
    assert!(long.len() > 8 * chunk, "{}", long.len());
    let b = sched
        .submit(
            long.clone(),
            greedy(8),
            Box::new(|_| ControlFlow::Continue(())),
        )
        .unwrap();
    let mut prefill_steps = 0;
    loop {
        let before_a = sched.progress(a);
        let before_b = sched.progress(b);
        let ended = sched.step();
        assert!(ended.is_empty(), "{ended:?}");
        let (Progress::Active { generated: ga0, .. }, Progress::Active { generated: ga1, .. }) =
            (before_a, sched.progress(a))
        else {
            panic!("A left: {:?}", sched.progress(a));
        };
        // A gets its token in every step while B reads its prompt.
        assert_eq!(ga1, ga0 + 1);
        let fed0 = match before_b {
            Progress::Active { fed, .. } => fed,
            _ => 0,
        };
        let Progress::Active { fed, generated } = sched.progress(b) else {
            panic!("B left");
        };
        assert!(
            fed - fed0 <= chunk,
            "B read {} prompt tokens in one step",
            fed - fed0
        );
        prefill_steps += 1;
        if generated > 0 {
            break;
        }
    }
    assert!(prefill_steps >= long.len() / chunk, "{prefill_steps}");
}

#[test]
fn the_caps_queue_or_refuse() {
    // One sequence's reservation: prompt + max_tokens positions, values
    // exactly, keys rounded up to whole blocks of 16 positions, bfloat16.
    let p = ids(QUESTIONS[0]);
    let n = p.len() + 10;
    let one = {
        let mut s = model().scheduler(cfg());
        s.submit(
            p.clone(),
            greedy(10),
            Box::new(|_| ControlFlow::Continue(())),
        )
        .unwrap();
        s.step();
        s.load().kv_bytes
    };
    assert_eq!(one, 30 * 3 * 64 * 2 * (n.div_ceil(16) * 16 + n));
    // Room for two sequences' caches; at most three active; queue of one.
    let mut sched = model().scheduler(SchedulerConfig {
        max_active: 3,
        max_queue: 1,
        max_kv_bytes: 2 * one,
        ..cfg()
    });
    let on = || -> OnText<'static> { Box::new(|_| ControlFlow::Continue(())) };
    let s1 = sched.submit(p.clone(), greedy(10), on()).unwrap();
    let s2 = sched.submit(p.clone(), greedy(10), on()).unwrap();
    sched.step();
    let s3 = sched.submit(p.clone(), greedy(10), on()).unwrap();
    let e = sched.submit(p.clone(), greedy(10), on()).unwrap_err();
    assert!(matches!(e, GenerateError::QueueFull { queued: 1 }), "{e}");
    let e = sched.submit(p.clone(), greedy(4000), on()).unwrap_err();
    assert!(matches!(e, GenerateError::TooBigForCache { .. }), "{e}");
    sched.step();
    assert_eq!(sched.progress(s3), Progress::Queued, "the KV cap holds it");
    assert_eq!(sched.load().active, 2);
    let r = run_all(&mut sched, &[s1, s2, s3], Ended::new());
    assert!(r.iter().all(Result::is_ok));
    // A queued sequence whose deadline passes leaves the line with its own error.
    let mut sched = model().scheduler(SchedulerConfig {
        max_active: 1,
        ..cfg()
    });
    let s1 = sched.submit(p.clone(), greedy(10), on()).unwrap();
    let s2 = sched
        .submit(
            p.clone(),
            GenerateParams {
                deadline: Some(Instant::now()),
                ..greedy(10)
            },
            on(),
        )
        .unwrap();
    let r = run_all(&mut sched, &[s1, s2], Ended::new());
    assert!(r[0].is_ok());
    assert!(
        matches!(r[1], Err(GenerateError::QueueTimeout { .. })),
        "{:?}",
        r[1]
    );
}

#[test]
fn the_engine_thread_serves_concurrent_sequences_and_reports_its_load() {
    static ENGINE_MODEL: OnceLock<Arc<EmbeddedModel>> = OnceLock::new();
    let m = ENGINE_MODEL.get_or_init(|| Arc::new(EmbeddedModel::load(&model_path()).unwrap()));
    let engine = BatchEngine::start(Arc::clone(m), cfg()).unwrap();
    let want: Vec<String> = QUESTIONS.iter().map(|q| alone(q, 24)).collect();
    let (tx, rx) = mpsc::channel();
    let streamed: Vec<Arc<Mutex<String>>> = QUESTIONS.iter().map(|_| Arc::default()).collect();
    for (i, q) in QUESTIONS.iter().enumerate() {
        let tx = tx.clone();
        let s = Arc::clone(&streamed[i]);
        engine.submit(
            ids(q),
            greedy(24),
            Box::new(move |piece| {
                s.lock().unwrap().push_str(piece);
                ControlFlow::Continue(())
            }),
            Box::new(move |r| tx.send((i, r)).unwrap()),
        );
    }
    let mut saw_load = false;
    let mut got = vec![String::new(); QUESTIONS.len()];
    for _ in 0..QUESTIONS.len() {
        let (i, r) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        let l = engine.load();
        saw_load |= l.tokens_per_second > 0.0 && l.generated_total > 0;
        got[i] = r.unwrap().text;
    }
    assert_eq!(got, want);
    for (s, w) in streamed.iter().zip(&want) {
        assert_eq!(*s.lock().unwrap(), *w, "streamed pieces make the answer");
    }
    assert!(saw_load);
    let l = engine.load();
    assert_eq!((l.active, l.queued, l.kv_bytes), (0, 0, 0));
}

#[test]
fn a_queue_of_none_still_serves_what_fits_at_once() {
    let p = ids(QUESTIONS[0]);
    let on = || -> OnText<'static> { Box::new(|_| ControlFlow::Continue(())) };
    let mut sched = model().scheduler(SchedulerConfig {
        max_active: 2,
        max_queue: 0,
        ..cfg()
    });
    let a = sched.submit(p.clone(), greedy(10), on()).unwrap();
    let b = sched.submit(p.clone(), greedy(10), on()).unwrap();
    assert!(matches!(sched.progress(b), Progress::Active { .. }));
    let e = sched.submit(p.clone(), greedy(10), on()).unwrap_err();
    assert!(matches!(e, GenerateError::QueueFull { queued: 0 }), "{e}");
    let r = run_all(&mut sched, &[a, b], Ended::new());
    assert!(r.iter().all(Result::is_ok), "{r:?}");
}

/// Sequences decoded together share each step's time: what they are
/// charged for (`compute`) adds up to at most the time the batch took, not
/// to that time once per sequence.
#[test]
fn sequences_decoded_together_share_the_compute() {
    let mut sched = model().scheduler(cfg());
    let started = Instant::now();
    let seqs: Vec<u64> = QUESTIONS
        .iter()
        .map(|q| {
            sched
                .submit(ids(q), greedy(24), Box::new(|_| ControlFlow::Continue(())))
                .unwrap()
        })
        .collect();
    let done: Vec<Completion> = run_all(&mut sched, &seqs, Ended::new())
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let wall = started.elapsed();
    let charged: Duration = done.iter().map(|c| c.compute).sum();
    assert!(done.iter().all(|c| c.compute > Duration::ZERO), "{done:?}");
    assert!(
        charged <= wall,
        "charged {charged:?} for a batch that took {wall:?}"
    );
    // Each was in the batch for most of that time: charging each its time
    // in the batch would have charged several times the wall time.
    let in_batch: Duration = done.iter().map(|c| c.first_token + c.decode).sum();
    assert!(in_batch > wall * 2, "in batch {in_batch:?}, wall {wall:?}");
}

/// A token id outside the vocabulary is refused when submitted (it would
/// index past the embedding table in a step), and the scheduler goes on.
#[test]
fn an_id_outside_the_vocabulary_is_refused_at_submit() {
    let mut sched = model().scheduler(cfg());
    let vocab = model().info().vocab_size as u32;
    let mut bad = ids(QUESTIONS[0]);
    bad.push(vocab);
    let e = sched
        .submit(bad, greedy(8), Box::new(|_| ControlFlow::Continue(())))
        .unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    let ok = sched
        .submit(
            ids(QUESTIONS[0]),
            greedy(8),
            Box::new(|_| ControlFlow::Continue(())),
        )
        .unwrap();
    let done = run_all(&mut sched, &[ok], Ended::new());
    assert_eq!(done[0].as_ref().unwrap().completion_tokens, 8, "{done:?}");
}
