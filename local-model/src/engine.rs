//! [`BatchEngine`]: one continuous-batching loop on its own thread.
//!
//! Callers submit sequences from any thread; the loop admits them between
//! steps, runs every active sequence in each step, streams text through
//! each sequence's callback and reports the end through its `done`
//! callback. It blocks when idle. Its load (active, queued, tokens/s) is
//! readable at any time without touching the loop.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sched::{Scheduler, SchedulerConfig, SeqId};
use crate::{Completion, EmbeddedModel, GenerateError, GenerateParams};

/// Hears how a sequence ended.
pub type OnDone = Box<dyn FnOnce(Result<Completion, GenerateError>) + Send>;

/// Receives each new piece of a sequence's text, from the engine's thread;
/// `Break` cancels the sequence.
pub type OnTextSend = Box<dyn FnMut(&str) -> ControlFlow<()> + Send>;

/// The window tokens/s is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(5);

struct Submit {
    prompt: Vec<u32>,
    params: GenerateParams,
    on_text: OnTextSend,
    done: OnDone,
}

#[derive(Default)]
struct Shared {
    /// Sent but not yet seen by the loop.
    in_channel: AtomicUsize,
    active: AtomicUsize,
    queued: AtomicUsize,
    kv_bytes: AtomicUsize,
    generated_total: AtomicU64,
    /// f64 bits.
    tokens_per_second: AtomicU64,
    /// Milliseconds since `epoch` of the last step.
    last_step_ms: AtomicU64,
}

/// The load of a [`BatchEngine`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineLoad {
    pub active: usize,
    /// Waiting to join the batch.
    pub queued: usize,
    pub max_active: usize,
    pub kv_bytes: usize,
    pub max_kv_bytes: usize,
    /// Tokens generated per second over the last few seconds (all
    /// sequences).
    pub tokens_per_second: f64,
    pub generated_total: u64,
}

pub struct BatchEngine {
    tx: Mutex<Sender<Submit>>,
    shared: Arc<Shared>,
    cfg: SchedulerConfig,
    epoch: Instant,
    thread: Option<JoinHandle<()>>,
}

impl BatchEngine {
    /// Starts the loop.
    pub fn start(model: Arc<EmbeddedModel>, cfg: SchedulerConfig) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let epoch = Instant::now();
        let thread = {
            let shared = Arc::clone(&shared);
            let cfg = cfg.clone();
            std::thread::Builder::new()
                .name("smollm-engine".into())
                .spawn(move || run(&model, cfg, &rx, &shared, epoch))?
        };
        Ok(BatchEngine {
            tx: Mutex::new(tx),
            shared,
            cfg,
            epoch,
            thread: Some(thread),
        })
    }

    /// Queues a sequence. `on_text` gets each new piece of text (returning
    /// `Break` cancels), `done` the end, always exactly once (also when
    /// the engine has stopped).
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: GenerateParams,
        on_text: OnTextSend,
        done: OnDone,
    ) {
        self.shared.in_channel.fetch_add(1, Ordering::SeqCst);
        let msg = Submit {
            prompt,
            params,
            on_text,
            done,
        };
        let sent = match self.tx.lock() {
            Ok(tx) => tx.send(msg).map_err(|e| e.0),
            Err(_) => Err(msg),
        };
        if let Err(msg) = sent {
            self.shared.in_channel.fetch_sub(1, Ordering::SeqCst);
            (msg.done)(Err(GenerateError::Stopped));
        }
    }

    pub fn load(&self) -> EngineLoad {
        let s = &self.shared;
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let idle = now_ms.saturating_sub(s.last_step_ms.load(Ordering::Relaxed))
            > RATE_WINDOW.as_millis() as u64;
        EngineLoad {
            active: s.active.load(Ordering::SeqCst),
            queued: s.queued.load(Ordering::SeqCst) + s.in_channel.load(Ordering::SeqCst),
            max_active: self.cfg.max_active,
            kv_bytes: s.kv_bytes.load(Ordering::Relaxed),
            max_kv_bytes: self.cfg.max_kv_bytes,
            tokens_per_second: if idle {
                0.0
            } else {
                f64::from_bits(s.tokens_per_second.load(Ordering::Relaxed))
            },
            generated_total: s.generated_total.load(Ordering::Relaxed),
        }
    }

    /// Whether the loop is still running.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

/// The loop: take submissions (blocking when idle), step, report.
fn run(
    model: &EmbeddedModel,
    cfg: SchedulerConfig,
    rx: &Receiver<Submit>,
    shared: &Shared,
    epoch: Instant,
) {
    let mut sched = model.scheduler(cfg.clone());
    let mut dones: HashMap<SeqId, OnDone> = HashMap::new();
    let mut window: VecDeque<(Instant, u64)> = VecDeque::new();
    let take = |msg: Submit, sched: &mut Scheduler<'static>, dones: &mut HashMap<SeqId, OnDone>| {
        let result = sched.submit(msg.prompt, msg.params, msg.on_text);
        publish(sched, shared);
        shared.in_channel.fetch_sub(1, Ordering::SeqCst);
        match result {
            Ok(id) => {
                dones.insert(id, msg.done);
            }
            Err(e) => (msg.done)(Err(e)),
        }
    };
    loop {
        if sched.is_idle() {
            match rx.recv() {
                Ok(msg) => take(msg, &mut sched, &mut dones),
                Err(_) => return,
            }
        }
        // Finish what is running even when the sender is gone.
        while let Ok(msg) = rx.try_recv() {
            take(msg, &mut sched, &mut dones);
        }
        // A panic in a step (a bug: inputs are checked at submit) ends the
        // sequences that step held with an error and leaves the engine
        // serving with a fresh scheduler, rather than stopping the pool
        // while its endpoint keeps answering with errors.
        let finished = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sched.step()))
        {
            Ok(finished) => finished,
            Err(_) => {
                sched = model.scheduler(cfg.clone());
                for (_, done) in dones.drain() {
                    done(Err(GenerateError::Model(
                        "the embedded engine failed while generating (see the log)".into(),
                    )));
                }
                publish(&sched, shared);
                continue;
            }
        };
        let load = sched.load();
        let now = Instant::now();
        window.push_back((now, load.generated_total));
        while window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            window.pop_front();
        }
        if let Some((t0, g0)) = window.front() {
            let secs = now.duration_since(*t0).as_secs_f64();
            let rate = if secs > 0.0 {
                (load.generated_total - g0) as f64 / secs
            } else {
                0.0
            };
            shared
                .tokens_per_second
                .store(rate.to_bits(), Ordering::Relaxed);
        }
        shared
            .last_step_ms
            .store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        publish(&sched, shared);
        // The load is published before anyone hears their sequence ended.
        for (id, result) in finished {
            if let Some(done) = dones.remove(&id) {
                done(result);
            }
        }
    }
}

fn publish(sched: &Scheduler<'_>, shared: &Shared) {
    let load = sched.load();
    shared.active.store(load.active, Ordering::SeqCst);
    shared.queued.store(load.queued, Ordering::SeqCst);
    shared.kv_bytes.store(load.kv_bytes, Ordering::Relaxed);
    shared
        .generated_total
        .store(load.generated_total, Ordering::Relaxed);
}
