//! The worker pool: threads for blocking work (a database call, a file, a CPU-heavy step),
//! the half-sync half of plexus' half-sync/half-async design.
//!
//! A handler queues a job with [`crate::Session::spawn_blocking`]. Each session keeps its own
//! FIFO of jobs ([`WorkQueue`]) and has at most one job on the pool at a time, so its replies
//! leave in request order however many workers there are. The pool's queue is bounded
//! (`worker_queue`); a job that finds it full waits in its session's queue, and the loop tries
//! again on its own ([`PoolWaiters`]: after a completion, and on a timer with backoff, so a loop
//! that gets no completion of its own still retries). A session whose job cannot be queued
//! within `idle_timeout` is closed (`worker_pool_full`). Results return to the owning event
//! loop through a channel and its `mio::Waker`. A job that panics closes only its session.

use std::collections::VecDeque;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::Waker;

use crate::session_id::SessionId;

/// Work to run on the pool; what it writes into its [`Reply`] goes to the peer.
pub(crate) type Job = Box<dyn FnOnce(&mut Reply) + Send + 'static>;

/// What a blocking job answers: bytes for the peer, and whether to close afterwards.
#[derive(Debug, Default)]
pub struct Reply {
    data: Vec<u8>,
    close: bool,
}

impl Reply {
    /// Appends bytes to send to the peer (after the replies of earlier jobs).
    pub fn send(&mut self, data: &[u8]) {
        self.data.extend_from_slice(data);
    }

    /// Closes the session once this reply has been written.
    pub fn close(&mut self) {
        self.close = true;
    }

    pub(crate) fn into_parts(self) -> (Vec<u8>, bool) {
        (self.data, self.close)
    }
}

/// One session's jobs: waiting ones in order, and whether one is on the pool now.
#[derive(Default)]
pub(crate) struct WorkQueue {
    waiting: VecDeque<Job>,
    in_flight: bool,
}

impl WorkQueue {
    /// Jobs queued and not yet finished (waiting + the one on the pool).
    pub(crate) fn len(&self) -> usize {
        self.waiting
            .len()
            .saturating_add(usize::from(self.in_flight))
    }

    /// No job waiting or running.
    pub(crate) fn is_idle(&self) -> bool {
        !self.in_flight && self.waiting.is_empty()
    }

    pub(crate) fn push(&mut self, job: Job) {
        self.waiting.push_back(job);
    }

    /// The next job to hand to the pool, if none of this session's is running.
    pub(crate) fn next(&mut self) -> Option<Job> {
        if self.in_flight {
            return None;
        }
        let job = self.waiting.pop_front()?;
        self.in_flight = true;
        Some(job)
    }

    /// The pool could not take `job` (queue full): it goes back to the front.
    pub(crate) fn unsend(&mut self, job: Job) {
        self.in_flight = false;
        self.waiting.push_front(job);
        if self.waiting.capacity() > 64 && self.waiting.len() < 16 {
            self.waiting.shrink_to_fit();
        }
    }

    /// The running job finished.
    pub(crate) fn finished(&mut self) {
        self.in_flight = false;
        if self.waiting.is_empty() && self.waiting.capacity() > 0 {
            // Idle sessions hold no job memory.
            self.waiting = VecDeque::new();
        }
    }
}

/// First wait before a loop tries the pool's queue again…
const RETRY_FIRST: Duration = Duration::from_millis(1);
/// …doubling up to this.
const RETRY_MAX: Duration = Duration::from_millis(50);

/// A session of this loop whose next job found the pool's queue full, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolWaiter {
    pub(crate) key: usize,
    pub(crate) id: SessionId,
    pub(crate) since: Instant,
}

/// One loop's sessions waiting for room in the pool's queue, oldest first, and when to try
/// again. Retries do not depend on this loop's own completions: another loop's jobs may be the
/// ones holding the queue.
#[derive(Debug)]
pub(crate) struct PoolWaiters {
    waiting: Vec<PoolWaiter>,
    next_retry: Option<Instant>,
    backoff: Duration,
}

impl Default for PoolWaiters {
    fn default() -> Self {
        PoolWaiters {
            waiting: Vec::new(),
            next_retry: None,
            backoff: RETRY_FIRST,
        }
    }
}

impl PoolWaiters {
    /// `key` found the queue full at `now` (listed once, keeping its first time).
    pub(crate) fn add(&mut self, key: usize, id: SessionId, now: Instant) {
        if !self.waiting.iter().any(|w| w.key == key && w.id == id) {
            self.waiting.push(PoolWaiter {
                key,
                id,
                since: now,
            });
        }
        if self.next_retry.is_none() {
            self.next_retry = Some(plexus_proto::deadline_after(now, self.backoff));
        }
    }

    /// When the loop must wake to retry, if anyone waits.
    pub(crate) fn next_wakeup(&self) -> Option<Instant> {
        self.next_retry
    }

    /// The waiting sessions, oldest first, if a retry is due at `now` (or `force`d, after a
    /// completion made room). Whoever still finds the queue full goes back with [`Self::keep`].
    pub(crate) fn take_due(&mut self, now: Instant, force: bool) -> Vec<PoolWaiter> {
        let due = self.next_retry.is_some_and(|at| force || now >= at);
        if !due {
            return Vec::new();
        }
        self.next_retry = None;
        std::mem::take(&mut self.waiting)
    }

    /// `waiter` still waits: the next retry comes after a longer backoff.
    pub(crate) fn keep(&mut self, waiter: PoolWaiter, now: Instant) {
        self.waiting.push(waiter);
        if self.next_retry.is_none() {
            self.backoff = self.backoff.saturating_mul(2).min(RETRY_MAX);
            self.next_retry = Some(plexus_proto::deadline_after(now, self.backoff));
        }
    }

    /// Everyone got in: the next wait starts short again.
    pub(crate) fn settle(&mut self) {
        if self.waiting.is_empty() {
            self.backoff = RETRY_FIRST;
            self.next_retry = None;
            if self.waiting.capacity() > 64 {
                self.waiting = Vec::new();
            }
        }
    }
}

/// Where a job came from, so its result finds its way back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin {
    pub(crate) event_loop: usize,
    pub(crate) key: usize,
    pub(crate) id: SessionId,
}

/// A job on its way to a worker.
pub(crate) struct Task {
    pub(crate) origin: Origin,
    pub(crate) job: Job,
}

/// A job's result on its way back to the owning loop.
pub(crate) struct Completion {
    pub(crate) origin: Origin,
    /// `None` when the job panicked.
    pub(crate) reply: Option<Reply>,
}

/// How a worker reaches one event loop.
#[derive(Clone)]
pub(crate) struct CompletionSink {
    pub(crate) sender: Sender<Completion>,
    pub(crate) waker: Arc<Waker>,
}

/// Pool-wide counters.
#[derive(Debug, Default)]
pub(crate) struct PoolStats {
    /// Jobs in the queue, not yet taken by a worker.
    pub(crate) queued: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) panics: AtomicU64,
}

/// How an event loop hands jobs to the pool.
pub(crate) struct Submitter {
    tasks: Sender<Task>,
    stats: Arc<PoolStats>,
}

impl Submitter {
    /// Queues a task without blocking; gives it back if the queue is full or the pool gone.
    pub(crate) fn try_submit(&self, task: Task) -> Result<(), TrySendError<Task>> {
        // Counted before sending so a fast worker's decrement never precedes the increment.
        self.stats.queued.fetch_add(1, Relaxed);
        self.tasks.try_send(task).inspect_err(|_| {
            self.stats.queued.fetch_sub(1, Relaxed);
        })
    }
}

/// The worker threads and the sending side of their queue.
pub(crate) struct WorkerPool {
    tasks: Sender<Task>,
    threads: Vec<JoinHandle<()>>,
    pub(crate) stats: Arc<PoolStats>,
}

impl WorkerPool {
    /// Starts `workers` threads taking jobs from a queue of `capacity`.
    pub(crate) fn start(
        workers: usize,
        capacity: usize,
        sinks: Vec<CompletionSink>,
    ) -> io::Result<WorkerPool> {
        let (tasks, queue) = crossbeam_channel::bounded::<Task>(capacity);
        let stats = Arc::new(PoolStats::default());
        let sinks = Arc::new(sinks);
        let mut threads = Vec::with_capacity(workers);
        for index in 0..workers {
            let queue = queue.clone();
            let sinks = Arc::clone(&sinks);
            let stats = Arc::clone(&stats);
            let thread = thread::Builder::new()
                .name(format!("plexus-worker-{index}"))
                .spawn(move || work(&queue, &sinks, &stats))?;
            threads.push(thread);
        }
        Ok(WorkerPool {
            tasks,
            threads,
            stats,
        })
    }

    /// The queue's sending side and the pool's counters, one per event loop.
    pub(crate) fn submitter(&self) -> Submitter {
        Submitter {
            tasks: self.tasks.clone(),
            stats: Arc::clone(&self.stats),
        }
    }

    /// Lets the workers finish once every submitter is gone, and waits for them.
    pub(crate) fn join(self) {
        drop(self.tasks);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

fn work(queue: &Receiver<Task>, sinks: &[CompletionSink], stats: &PoolStats) {
    while let Ok(Task { origin, job }) = queue.recv() {
        stats.queued.fetch_sub(1, Relaxed);
        let mut reply = Reply::default();
        let reply = match catch_unwind(AssertUnwindSafe(|| job(&mut reply))) {
            Ok(()) => {
                stats.completed.fetch_add(1, Relaxed);
                Some(reply)
            }
            Err(_) => {
                stats.panics.fetch_add(1, Relaxed);
                None
            }
        };
        let Some(sink) = sinks.get(origin.event_loop) else {
            // No such loop: nobody waits for the result.
            return;
        };
        // Completions are bounded by the jobs in flight (queue + workers), and each loop's
        // channel is sized for that, so this send does not block in practice; it fails only
        // when the loop is gone, and then nobody waits for the result.
        if sink.sender.send(Completion { origin, reply }).is_ok() {
            let _ = sink.waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(tag: &'static str) -> Job {
        Box::new(move |reply: &mut Reply| reply.send(tag.as_bytes()))
    }

    #[test]
    fn waiters_are_retried_on_a_timer_with_backoff_without_any_completion() {
        let start = Instant::now();
        let mut waiters = PoolWaiters::default();
        assert!(waiters.next_wakeup().is_none());
        waiters.add(3, SessionId(30), start);
        waiters.add(3, SessionId(30), start + Duration::from_millis(5));
        waiters.add(4, SessionId(40), start);
        let first = waiters.next_wakeup().expect("a retry is scheduled");
        assert_eq!(first, start + RETRY_FIRST);
        assert!(waiters.take_due(start, false).is_empty(), "not due yet");
        let due = waiters.take_due(first, false);
        assert_eq!(
            due.iter().map(|w| (w.key, w.since)).collect::<Vec<_>>(),
            vec![(3, start), (4, start)],
            "each session once, oldest first, with its first time"
        );
        // Still full: the next try comes later and later, up to the cap.
        let mut at = first;
        let mut gaps = Vec::new();
        for _ in 0..10 {
            for waiter in waiters.take_due(at, true) {
                waiters.keep(waiter, at);
            }
            if gaps.is_empty() {
                for waiter in &due {
                    waiters.keep(*waiter, at);
                }
            }
            let next = waiters.next_wakeup().expect("still scheduled");
            gaps.push(next - at);
            at = next;
        }
        assert!(gaps.windows(2).all(|pair| pair[0] <= pair[1]), "{gaps:?}");
        assert_eq!(*gaps.last().unwrap(), RETRY_MAX);
        waiters.take_due(at, true);
        waiters.settle();
        assert!(waiters.next_wakeup().is_none());
        waiters.add(5, SessionId(50), at);
        assert_eq!(
            waiters.next_wakeup(),
            Some(at + RETRY_FIRST),
            "backoff reset"
        );
    }

    #[test]
    fn at_most_one_job_of_a_session_is_handed_out_at_a_time() {
        let mut queue = WorkQueue::default();
        queue.push(job("a"));
        queue.push(job("b"));
        let first = queue.next().expect("a is ready");
        assert!(queue.next().is_none(), "b waits while a runs");
        assert_eq!(queue.len(), 2);
        let mut reply = Reply::default();
        first(&mut reply);
        assert_eq!(reply.into_parts().0, b"a");
        queue.finished();
        let second = queue.next().expect("b is next");
        queue.unsend(second);
        assert!(!queue.is_idle());
        let again = queue.next().expect("b again, still first");
        let mut reply = Reply::default();
        again(&mut reply);
        assert_eq!(reply.into_parts().0, b"b");
        queue.finished();
        assert!(queue.is_idle());
    }
}
