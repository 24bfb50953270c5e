//! A small persistent team of helper threads that split each matrix
//! product by rows, so one generation (or one batch) uses every core.
//!
//! The weights are shared through an `Arc` and a job is a `'static`
//! closure, so no `unsafe` is needed: each helper computes its rows into
//! its own buffer, the caller computes the first part itself, then copies
//! the helpers' parts into place. Buffers go back and forth, so steady
//! state allocates nothing but the job's `Arc`.
//!
//! Between jobs a helper spins briefly, then yields its core for up to a
//! millisecond, before it blocks: the products of one forward pass come
//! every few tens of microseconds, much faster than a thread wakes from
//! sleep, and yielding keeps a busy (oversubscribed) machine moving; an
//! idle engine blocks and costs nothing.

use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Computes part `part` of a job into the buffer (cleared by the job).
pub type Job = Arc<dyn Fn(usize, &mut Vec<f32>) + Send + Sync>;

/// Pure spins (no system call) before a waiting thread starts yielding:
/// a few microseconds, the usual gap between two products of a step.
const SPINS: u32 = 2_000;
/// Then it yields its core (so an oversubscribed machine, or a helper that
/// was descheduled, is not held up by the spinning) for at most this long
/// before it blocks: a helper waiting for the next job, ...
const HELPER_YIELD: Duration = Duration::from_millis(1);
/// ... and the caller waiting for a helper's part (usually nearly done).
const CALLER_YIELD: Duration = Duration::from_millis(5);

struct Helper {
    jobs: Option<Sender<(Job, usize, Vec<f32>)>>,
    done: Receiver<Vec<f32>>,
    handle: Option<JoinHandle<()>>,
    spare: Vec<f32>,
}

pub struct Team {
    helpers: Vec<Helper>,
    local: Vec<f32>,
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

impl Team {
    /// `threads` in all, the caller's included (at least 1).
    pub fn new(threads: usize) -> Team {
        let helpers = (1..threads.max(1))
            .filter_map(|i| {
                let (jobs, job_rx) = mpsc::channel::<(Job, usize, Vec<f32>)>();
                let (done_tx, done) = mpsc::channel();
                let handle = std::thread::Builder::new()
                    .name(format!("smollm-helper-{i}"))
                    .spawn(move || {
                        while let Some((job, part, mut buf)) = recv_spin(&job_rx, HELPER_YIELD) {
                            job(part, &mut buf);
                            // The job's data (activations) is released before
                            // the caller hears back, so it can reuse it.
                            drop(job);
                            if done_tx.send(buf).is_err() {
                                break;
                            }
                        }
                    })
                    .ok()?;
                Some(Helper {
                    jobs: Some(jobs),
                    done,
                    handle: Some(handle),
                    spare: Vec::new(),
                })
            })
            .collect();
        Team {
            helpers,
            local: Vec::new(),
        }
    }

    /// Threads working on each job, the caller's included.
    pub fn size(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `job(part)` for every part, part 0 on the calling thread, and
    /// hands each part's buffer to `merge` on the calling thread. A helper
    /// that is gone (it panicked) has its part run by the caller.
    pub fn run(&mut self, job: &Job, mut merge: impl FnMut(usize, &[f32])) {
        let mut sent = vec![false; self.helpers.len()];
        for (i, h) in self.helpers.iter_mut().enumerate() {
            let buf = std::mem::take(&mut h.spare);
            if let Some(tx) = &h.jobs {
                sent[i] = tx.send((Arc::clone(job), i + 1, buf)).is_ok();
            }
        }
        job(0, &mut self.local);
        merge(0, &self.local);
        for (i, h) in self.helpers.iter_mut().enumerate() {
            let got = if sent[i] {
                recv_spin(&h.done, CALLER_YIELD)
            } else {
                None
            };
            let buf = match got {
                Some(buf) => buf,
                None => {
                    h.jobs = None;
                    let mut buf = Vec::new();
                    job(i + 1, &mut buf);
                    buf
                }
            };
            merge(i + 1, &buf);
            h.spare = buf;
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        for h in &mut self.helpers {
            h.jobs = None;
        }
        for h in &mut self.helpers {
            if let Some(handle) = h.handle.take() {
                let _ = handle.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_and_merges_in_order() {
        for threads in [1, 2, 3] {
            let mut team = Team::new(threads);
            assert_eq!(team.size(), threads);
            for round in 0..50 {
                let job: Job = Arc::new(move |part, buf: &mut Vec<f32>| {
                    buf.clear();
                    buf.extend([part as f32, round as f32]);
                });
                let mut seen = Vec::new();
                team.run(&job, |part, buf| seen.push((part, buf.to_vec())));
                let want: Vec<_> = (0..threads)
                    .map(|p| (p, vec![p as f32, round as f32]))
                    .collect();
                assert_eq!(seen, want);
            }
        }
    }
}
