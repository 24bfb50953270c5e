//! Continuous batching: the sequences of one engine advance together, one
//! [`Scheduler::step`] at a time.
//!
//! A step feeds one new token of every decoding sequence plus at most
//! `prefill_chunk` prompt tokens (of the oldest sequences still reading
//! their prompt) through the model as one batch, so each weight read serves
//! them all, and a long prompt never holds the others up by more than one
//! chunk. Between steps, finished, cancelled and expired sequences leave,
//! and queued ones join while the caps allow (active sequences, KV cache
//! bytes); the rest wait in line with their deadlines.
//!
//! Each sequence keeps its own KV cache, sampler, stop rules, deadline and
//! cancellation flag. Greedy tokens do not depend on the company a sequence
//! keeps: every row is computed with the same arithmetic alone or batched.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::{Forward, KvCache, Row, StepTimes, Weights};
use crate::text::{apply_repeat_penalty, Sampler, TextStream};
use crate::tokenizer::ChatTokenizer;
use crate::{Completion, FinishReason, GenerateError, GenerateParams};

/// Receives each new piece of a sequence's text; `Break` cancels it.
pub type OnText<'a> = Box<dyn FnMut(&str) -> ControlFlow<()> + 'a>;

/// A sequence's id within its scheduler.
pub type SeqId = u64;

/// The batching limits.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences decoded together; more wait in line.
    pub max_active: usize,
    /// Sequences waiting in line; past it, [`GenerateError::QueueFull`].
    pub max_queue: usize,
    /// KV cache bytes reserved by active sequences (each reserves room for
    /// its prompt and its `max_tokens` when it joins).
    pub max_kv_bytes: usize,
    /// Prompt tokens per step, over all sequences reading their prompt.
    pub prefill_chunk: usize,
    /// Threads per step (the engine's own included).
    pub threads: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_active: 16,
            max_queue: 256,
            max_kv_bytes: 512 << 20,
            prefill_chunk: 64,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// What the model needs besides its weights, shared by schedulers.
#[derive(Clone)]
pub(crate) struct Vocab {
    pub tokenizer: Arc<ChatTokenizer>,
    pub stop_ids: Vec<u32>,
}

struct Waiting<'a> {
    id: SeqId,
    prompt: Vec<u32>,
    params: GenerateParams,
    on_text: OnText<'a>,
    submitted: Instant,
    budget: usize,
    kv_tokens: usize,
}

struct Active<'a> {
    id: SeqId,
    prompt: Vec<u32>,
    /// Prompt tokens fed so far.
    fed: usize,
    params: GenerateParams,
    on_text: OnText<'a>,
    sampler: Sampler,
    text: TextStream,
    /// Prompt and generated tokens (for the repeat penalty).
    history: Vec<u32>,
    generated: u32,
    budget: usize,
    /// The last sampled token, fed in the next step.
    next: Option<u32>,
    cache: KvCache,
    kv_bytes: usize,
    queued: Duration,
    admitted: Instant,
    first_token: Option<Duration>,
    /// Its share of the steps' time so far (see `Completion::compute`).
    compute: Duration,
}

impl Active<'_> {
    fn check(&self, now: Instant) -> Result<(), GenerateError> {
        if cancelled(&self.params) {
            return Err(GenerateError::Cancelled);
        }
        if self.params.deadline.is_some_and(|d| now >= d) {
            return Err(GenerateError::DeadlineExceeded {
                completion_tokens: self.generated,
            });
        }
        Ok(())
    }

    fn emit(&mut self, piece: &str) -> Result<(), GenerateError> {
        if !piece.is_empty() && (self.on_text)(piece).is_break() {
            return Err(GenerateError::Cancelled);
        }
        Ok(())
    }

    /// The answer so far, with the rest of the text streamed.
    fn complete(&mut self, finish: FinishReason) -> Result<Completion, GenerateError> {
        let stream = std::mem::replace(&mut self.text, TextStream::new(Vec::new()));
        let (piece, text) = stream.finish();
        self.emit(&piece)?;
        let elapsed = self.admitted.elapsed();
        let first_token = self.first_token.unwrap_or(elapsed);
        Ok(Completion {
            text,
            prompt_tokens: u32::try_from(self.prompt.len()).unwrap_or(u32::MAX),
            completion_tokens: self.generated,
            finish_reason: finish,
            first_token,
            decode: elapsed.saturating_sub(first_token),
            queued: self.queued,
            compute: self.compute,
        })
    }
}

fn cancelled(p: &GenerateParams) -> bool {
    p.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
}

/// Where a sequence is, for tests and stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Queued,
    /// Prompt tokens fed, tokens generated.
    Active {
        fed: usize,
        generated: u32,
    },
    /// Finished (or never known).
    Gone,
}

/// Load figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    pub active: usize,
    pub queued: usize,
    /// KV cache bytes reserved by the active sequences.
    pub kv_bytes: usize,
    /// Tokens generated since the scheduler started.
    pub generated_total: u64,
    pub steps: u64,
}

/// The sequences of one engine and the batches they run in.
pub struct Scheduler<'a> {
    cfg: SchedulerConfig,
    forward: Forward,
    vocab: Vocab,
    context: usize,
    waiting: VecDeque<Waiting<'a>>,
    active: Vec<Active<'a>>,
    next_id: SeqId,
    kv_bytes: usize,
    generated_total: u64,
    steps: u64,
    rows: Vec<Row>,
}

impl<'a> Scheduler<'a> {
    pub(crate) fn new(weights: Arc<Weights>, vocab: Vocab, cfg: SchedulerConfig) -> Self {
        let context = weights.cfg.context;
        Scheduler {
            forward: Forward::new(weights, cfg.threads.max(1)),
            cfg: SchedulerConfig {
                max_active: cfg.max_active.max(1),
                prefill_chunk: cfg.prefill_chunk.max(1),
                ..cfg
            },
            vocab,
            context,
            waiting: VecDeque::new(),
            active: Vec::new(),
            next_id: 0,
            kv_bytes: 0,
            generated_total: 0,
            steps: 0,
            rows: Vec::new(),
        }
    }

    /// Queues a sequence (templated prompt ids). Refuses at once what can
    /// never run: an empty or too long prompt, a KV reservation past the
    /// cap, a full queue.
    pub fn submit(
        &mut self,
        prompt: Vec<u32>,
        params: GenerateParams,
        on_text: OnText<'a>,
    ) -> Result<SeqId, GenerateError> {
        if prompt.is_empty() {
            return Err(GenerateError::Tokenizer("empty prompt".into()));
        }
        let vocab = self.forward.weights().cfg.vocab;
        if let Some(bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(GenerateError::Tokenizer(format!(
                "token id {bad} is outside the vocabulary ({vocab} tokens)"
            )));
        }
        if prompt.len() >= self.context {
            return Err(GenerateError::PromptTooLong {
                tokens: prompt.len(),
                limit: self.context,
            });
        }
        let budget = (params.max_tokens as usize).min(self.context - prompt.len());
        let kv_tokens = prompt.len() + budget;
        let need = self.forward.weights().kv_bytes(kv_tokens);
        if need > self.cfg.max_kv_bytes {
            return Err(GenerateError::TooBigForCache {
                needed: need,
                cap: self.cfg.max_kv_bytes,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Waiting {
            id,
            prompt,
            params,
            on_text,
            submitted: Instant::now(),
            budget,
            kv_tokens,
        });
        // It joins the batch at once if the caps allow; only what cannot
        // join counts against the queue (`max_queue: 0`: no waiting).
        self.admit();
        if self.waiting.len() > self.cfg.max_queue {
            self.waiting.pop_back();
            return Err(GenerateError::QueueFull {
                queued: self.waiting.len(),
            });
        }
        Ok(id)
    }

    /// Nothing to do.
    /// Where the model's steps spent their time so far.
    pub fn step_times(&self) -> StepTimes {
        self.forward.times()
    }

    pub fn is_idle(&self) -> bool {
        self.active.is_empty() && self.waiting.is_empty()
    }

    pub fn load(&self) -> Load {
        Load {
            active: self.active.len(),
            queued: self.waiting.len(),
            kv_bytes: self.kv_bytes,
            generated_total: self.generated_total,
            steps: self.steps,
        }
    }

    pub fn progress(&self, id: SeqId) -> Progress {
        if let Some(a) = self.active.iter().find(|a| a.id == id) {
            return Progress::Active {
                fed: a.fed,
                generated: a.generated,
            };
        }
        if self.waiting.iter().any(|w| w.id == id) {
            return Progress::Queued;
        }
        Progress::Gone
    }

    /// Admits waiting sequences while the caps allow, in order.
    fn admit(&mut self) {
        while self.active.len() < self.cfg.max_active {
            let Some(w) = self.waiting.front() else { break };
            let bytes = self.forward.weights().kv_bytes(w.kv_tokens);
            if self.kv_bytes + bytes > self.cfg.max_kv_bytes {
                break;
            }
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            self.kv_bytes += bytes;
            let now = Instant::now();
            self.active.push(Active {
                id: w.id,
                history: w.prompt.clone(),
                cache: KvCache::new(&self.forward.weights().cfg, w.kv_tokens),
                fed: 0,
                sampler: Sampler::new(&w.params),
                text: TextStream::new(w.params.stop.clone()),
                params: w.params,
                on_text: w.on_text,
                prompt: w.prompt,
                generated: 0,
                budget: w.budget,
                next: None,
                kv_bytes: bytes,
                queued: now.duration_since(w.submitted),
                admitted: now,
                first_token: None,
                compute: Duration::ZERO,
            });
        }
    }

    /// One step: admit, expire, run one batch, sample, retire. Returns the
    /// sequences that ended, with their answers or errors.
    pub fn step(&mut self) -> Vec<(SeqId, Result<Completion, GenerateError>)> {
        let mut done = Vec::new();
        let now = Instant::now();
        // Waiting sequences whose requester left or whose deadline passed
        // end before admission, so none takes a place it cannot use.
        self.waiting.retain(|w| {
            let err = if cancelled(&w.params) {
                GenerateError::Cancelled
            } else if w.params.deadline.is_some_and(|d| now >= d) {
                GenerateError::QueueTimeout {
                    waited: now.duration_since(w.submitted),
                }
            } else {
                return true;
            };
            done.push((w.id, Err(err)));
            false
        });
        self.admit();
        let mut ended: Vec<(usize, Result<Completion, GenerateError>)> = Vec::new();
        for (i, a) in self.active.iter().enumerate() {
            if let Err(e) = a.check(now) {
                ended.push((i, Err(e)));
            }
        }
        self.retire(&mut ended, &mut done);

        // The batch: every decoding sequence's next token, then prompt
        // chunks within the prefill budget, oldest first.
        self.rows.clear();
        let mut budget = self.cfg.prefill_chunk;
        for (i, a) in self.active.iter().enumerate() {
            if let Some(t) = a.next {
                self.rows.push(Row {
                    seq: i,
                    token: t,
                    logits: true,
                });
            }
        }
        let mut feeds = Vec::new();
        for (i, a) in self.active.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if a.next.is_some() || a.fed >= a.prompt.len() {
                continue;
            }
            let k = budget.min(a.prompt.len() - a.fed);
            budget -= k;
            for j in a.fed..a.fed + k {
                self.rows.push(Row {
                    seq: i,
                    token: a.prompt[j],
                    logits: j + 1 == a.prompt.len(),
                });
            }
            feeds.push((i, k));
        }
        if self.rows.is_empty() {
            return done;
        }
        let mut caches: Vec<&mut KvCache> = self.active.iter_mut().map(|a| &mut a.cache).collect();
        let started = Instant::now();
        self.forward.step(&self.rows, &mut caches);
        let took = started.elapsed();
        drop(caches);
        // Each sequence pays the part of the step its rows were.
        let share = took.div_f64(self.rows.len() as f64);
        for row in &self.rows {
            self.active[row.seq].compute += share;
        }
        self.steps += 1;
        for (i, k) in feeds {
            self.active[i].fed += k;
        }

        // Sample the rows that produced logits, in row order.
        let vocab = self.forward.weights().cfg.vocab;
        let mut li = 0;
        let rows = std::mem::take(&mut self.rows);
        for row in &rows {
            if !row.logits {
                continue;
            }
            let logits = &mut self.forward.logits[li * vocab..(li + 1) * vocab];
            li += 1;
            let a = &mut self.active[row.seq];
            a.next = None;
            let before = a.generated;
            let result = Self::advance(a, logits, &self.vocab);
            self.generated_total += u64::from(a.generated - before);
            if let Some(result) = result {
                ended.push((row.seq, result));
            }
        }
        self.rows = rows;
        self.retire(&mut ended, &mut done);
        done
    }

    /// Samples a sequence's next token. `Some` when the sequence ends.
    fn advance(
        a: &mut Active<'_>,
        logits: &mut [f32],
        vocab: &Vocab,
    ) -> Option<Result<Completion, GenerateError>> {
        if a.generated as usize >= a.budget {
            return Some(a.complete(FinishReason::Length));
        }
        let window = a.history.len().saturating_sub(a.params.repeat_last_n);
        apply_repeat_penalty(logits, a.params.repeat_penalty, &a.history[window..]);
        let next = a.sampler.sample(logits);
        a.generated += 1;
        if a.first_token.is_none() {
            a.first_token = Some(a.admitted.elapsed());
        }
        if vocab.stop_ids.contains(&next) {
            return Some(a.complete(FinishReason::Stop));
        }
        a.history.push(next);
        let (piece, stopped) = a.text.push(vocab.tokenizer.token_bytes(next));
        if let Err(e) = a.emit(&piece) {
            return Some(Err(e));
        }
        if stopped {
            return Some(a.complete(FinishReason::Stop));
        }
        if a.generated as usize >= a.budget {
            return Some(a.complete(FinishReason::Length));
        }
        a.next = Some(next);
        None
    }

    /// Removes ended sequences (indices into `active`), freeing their KV
    /// caches before anyone hears of the end.
    fn retire(
        &mut self,
        ended: &mut Vec<(usize, Result<Completion, GenerateError>)>,
        done: &mut Vec<(SeqId, Result<Completion, GenerateError>)>,
    ) {
        ended.sort_by_key(|e| std::cmp::Reverse(e.0));
        for (i, result) in ended.drain(..) {
            let a = self.active.remove(i);
            self.kv_bytes -= a.kv_bytes;
            done.push((a.id, result));
        }
    }
}
