//! A small persistent team of helper threads that split each matrix
//! product by rows, so one generation (or one batch) uses every core.
//!
//! A product is cut into [`Team::parts`] parts (a few per thread). Whoever
//! is running claims the next part from a shared counter, the caller
//! included, so a helper that the OS has not scheduled (a busy or
//! oversubscribed machine) holds nothing up: the caller takes the parts
//! nobody claimed, and runs a part a helper claimed but has not delivered
//! within about twice a part's time itself (the late copy is dropped).
//!
//! The weights are shared through an `Arc` and a job is a `'static`
//! closure, so no `unsafe` is needed: a helper computes a part into its own
//! buffer and sends it back, and the caller copies it into place; the
//! caller computes its own parts in place.
//!
//! Between jobs a helper spins briefly, then yields its core for up to a
//! millisecond, before it blocks: the products of one forward pass come
//! every few tens of microseconds, much faster than a thread wakes from
//! sleep, and yielding keeps a busy machine moving; an idle engine blocks
//! and costs nothing.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Computes part `part` of a job into the buffer (cleared by the job).
pub type Job = Arc<dyn Fn(usize, &mut Vec<f32>) + Send + Sync>;

/// Pure spins (no system call) before a waiting thread starts yielding:
/// a few microseconds, the usual gap between two products of a step.
const SPINS: u32 = 2_000;
/// Then it yields its core for at most this long before it blocks: a
/// helper waiting for the next job, ...
const HELPER_YIELD: Duration = Duration::from_millis(1);
/// How long the caller waits for a part a helper claimed before it runs
/// the part itself: twice its own time per part, within these bounds.
const MIN_PATIENCE: Duration = Duration::from_micros(20);
const MAX_PATIENCE: Duration = Duration::from_millis(2);
/// Parts per thread: enough that a descheduled helper holds up little.
const PARTS_PER_THREAD: usize = 2;

/// One product handed to the helpers.
struct Task {
    id: u64,
    job: Job,
    next: Arc<AtomicUsize>,
    parts: usize,
}

/// A part a helper computed (`None`: the job panicked on it).
struct Done {
    task: u64,
    part: usize,
    buf: Option<Vec<f32>>,
}

pub struct Team {
    jobs: Vec<Sender<Arc<Task>>>,
    done: Receiver<Done>,
    handles: Vec<JoinHandle<()>>,
    next_task: u64,
    /// Whether each part of the current task has been merged.
    merged: Vec<bool>,
}

fn recv_spin<T>(rx: &Receiver<T>, yield_for: Duration) -> Option<T> {
    for _ in 0..SPINS {
        match rx.try_recv() {
            Ok(v) => return Some(v),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => std::hint::spin_loop(),
        }
    }
    let started = Instant::now();
    while started.elapsed() < yield_for {
        match rx.try_recv() {
            Ok(v) => return Some(v),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
    rx.recv().ok()
}

/// A helper: claims parts of each task until none are left.
fn helper(tasks: &Receiver<Arc<Task>>, done: &Sender<Done>) {
    while let Some(task) = recv_spin(tasks, HELPER_YIELD) {
        loop {
            let part = task.next.fetch_add(1, Ordering::AcqRel);
            if part >= task.parts {
                break;
            }
            let mut buf = Vec::new();
            let ok = catch_unwind(AssertUnwindSafe(|| (task.job)(part, &mut buf))).is_ok();
            let msg = Done {
                task: task.id,
                part,
                buf: ok.then_some(buf),
            };
            if done.send(msg).is_err() || !ok {
                return;
            }
        }
        // The job's data (activations) is released before the next task.
        drop(task);
    }
}

impl Team {
    /// `threads` in all, the caller's included (at least 1).
    pub fn new(threads: usize) -> Team {
        let (done_tx, done) = mpsc::channel();
        let mut jobs = Vec::new();
        let mut handles = Vec::new();
        for i in 1..threads.max(1) {
            let (tx, rx) = mpsc::channel::<Arc<Task>>();
            let done_tx = done_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("smollm-helper-{i}"))
                .spawn(move || helper(&rx, &done_tx));
            if let Ok(h) = spawned {
                jobs.push(tx);
                handles.push(h);
            }
        }
        Team {
            jobs,
            done,
            handles,
            next_task: 0,
            merged: Vec::new(),
        }
    }

    /// Parts each job is cut into.
    pub fn parts(&self) -> usize {
        if self.jobs.is_empty() {
            1
        } else {
            (self.jobs.len() + 1) * PARTS_PER_THREAD
        }
    }

    /// Runs every part in `0..self.parts()` on whichever thread claims it,
    /// the caller included, and hands `handle`, on the calling thread,
    /// every part exactly once: the caller's own to compute straight into
    /// their final place (`Part::Own`), the helpers' (`job` run into a
    /// buffer) to copy there (`Part::Done`). Parts a helper claimed but did
    /// not deliver in time (descheduled, or it panicked) come back as the
    /// caller's own.
    pub fn run_with(&mut self, job: &Job, mut handle: impl FnMut(Part<'_>)) {
        let parts = self.parts();
        if parts == 1 {
            handle(Part::Own(0));
            return;
        }
        self.next_task += 1;
        let task = Arc::new(Task {
            id: self.next_task,
            job: Arc::clone(job),
            next: Arc::new(AtomicUsize::new(0)),
            parts,
        });
        self.jobs.retain(|tx| tx.send(Arc::clone(&task)).is_ok());
        self.merged.clear();
        self.merged.resize(parts, false);
        let mut left = parts;
        let started = Instant::now();
        let mut own = 0u32;
        loop {
            let part = task.next.fetch_add(1, Ordering::AcqRel);
            if part >= parts {
                break;
            }
            handle(Part::Own(part));
            self.merged[part] = true;
            left -= 1;
            own += 1;
        }
        // A helper's part normally arrives within about the time a part
        // takes; one that does not (its thread was descheduled) is run here
        // instead of waited for, and its late copy is dropped.
        let patience = match own {
            0 => MAX_PATIENCE,
            n => (started.elapsed() / n * 2).clamp(MIN_PATIENCE, MAX_PATIENCE),
        };
        let deadline = Instant::now() + patience;
        while left > 0 {
            let d = match self.done.try_recv() {
                Ok(d) => d,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) if Instant::now() < deadline => {
                    std::hint::spin_loop();
                    continue;
                }
                Err(TryRecvError::Empty) => break,
            };
            if d.task != task.id || self.merged[d.part] {
                continue;
            }
            let Some(buf) = d.buf else {
                // That helper is gone; its part is ours.
                break;
            };
            handle(Part::Done(d.part, &buf));
            self.merged[d.part] = true;
            left -= 1;
        }
        for part in 0..parts {
            if !self.merged[part] {
                handle(Part::Own(part));
                self.merged[part] = true;
            }
        }
    }
}

/// A part of a job, as [`Team::run_with`] hands it to the caller.
pub enum Part<'a> {
    /// For the caller to compute.
    Own(usize),
    /// Computed by a helper, into this buffer.
    Done(usize, &'a [f32]),
}

impl Drop for Team {
    fn drop(&mut self) {
        self.jobs.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every part's values, as the caller got them: its own parts
    /// computed by `job` on this thread, the helpers' as delivered.
    fn run(team: &mut Team, job: &Job) -> Vec<(usize, Vec<f32>)> {
        let mut seen = Vec::new();
        team.run_with(job, |p| match p {
            Part::Own(part) => {
                let mut buf = Vec::new();
                job(part, &mut buf);
                seen.push((part, buf));
            }
            Part::Done(part, buf) => seen.push((part, buf.to_vec())),
        });
        seen
    }

    #[test]
    fn every_part_is_merged_once() {
        for threads in [1, 2, 3] {
            let mut team = Team::new(threads);
            let parts = team.parts();
            assert_eq!(parts, if threads == 1 { 1 } else { threads * 2 });
            for round in 0..200 {
                let job: Job = Arc::new(move |part, buf: &mut Vec<f32>| {
                    buf.clear();
                    buf.extend([part as f32, round as f32]);
                });
                let mut seen = Vec::new();
                seen.extend(run(&mut team, &job));
                seen.sort_by_key(|s| s.0);
                let want: Vec<_> = (0..parts)
                    .map(|p| (p, vec![p as f32, round as f32]))
                    .collect();
                assert_eq!(seen, want);
            }
        }
    }

    #[test]
    fn a_part_that_panics_on_a_helper_is_run_by_the_caller() {
        use std::sync::atomic::AtomicBool;
        let mut team = Team::new(2);
        let caller = std::thread::current().id();
        let claimed = Arc::new(AtomicBool::new(false));
        let job: Job = {
            let claimed = Arc::clone(&claimed);
            Arc::new(move |part, buf: &mut Vec<f32>| {
                if std::thread::current().id() == caller {
                    // Until the helper has claimed a part (bounded), so
                    // the panic path runs.
                    let t = Instant::now();
                    while !claimed.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(5) {
                        std::thread::yield_now();
                    }
                } else {
                    claimed.store(true, Ordering::Release);
                    panic!("helper fails");
                }
                buf.clear();
                buf.push(part as f32);
            })
        };
        let mut seen = Vec::new();
        seen.extend(run(&mut team, &job));
        assert!(
            claimed.load(Ordering::Acquire),
            "the helper never claimed a part"
        );
        seen.sort_by_key(|s| s.0);
        let want: Vec<_> = (0..team.parts()).map(|p| (p, vec![p as f32])).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn a_stalled_helper_holds_nothing_up() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Mutex;
        let mut team = Team::new(2);
        let caller = std::thread::current().id();
        let (release, stalled) = mpsc::channel::<()>();
        let stalled = Arc::new(Mutex::new(stalled));
        let claimed = Arc::new(AtomicBool::new(false));
        let job: Job = {
            let claimed = Arc::clone(&claimed);
            Arc::new(move |part, buf: &mut Vec<f32>| {
                let on_caller = std::thread::current().id() == caller;
                if on_caller {
                    // Until the helper has claimed a part (bounded).
                    let t = Instant::now();
                    while !claimed.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(5) {
                        std::thread::yield_now();
                    }
                } else {
                    claimed.store(true, Ordering::Release);
                    // Stalls until the test releases it, after `run`.
                    if let Ok(rx) = stalled.lock() {
                        let _ = rx.recv_timeout(Duration::from_secs(10));
                    }
                }
                buf.clear();
                buf.extend([part as f32, f32::from(u8::from(on_caller))]);
            })
        };
        let mut seen = Vec::new();
        seen.extend(run(&mut team, &job));
        let _ = release.send(());
        assert!(
            claimed.load(Ordering::Acquire),
            "the helper never claimed a part"
        );
        seen.sort_by_key(|s| s.0);
        let want: Vec<_> = (0..team.parts())
            .map(|p| (p, vec![p as f32, 1.0]))
            .collect();
        assert_eq!(
            seen, want,
            "every part merged once, all computed by the caller"
        );
    }
}
