//! Worker threads, Envoy's threading model: each worker runs its own single-threaded tokio
//! runtime, accepts connections from every listener and serves each one it accepts on that
//! thread from start to end. A request's state (its streams, header copies, its wasm VM
//! replica, its upstream connection) therefore stays on one core instead of following tokio's
//! work stealing from thread to thread, and the workers share no queues or wake-ups.
//!
//! The runtime that started the gateway (`weir run`: two "control" threads) keeps the admin
//! listener, reloads, health checks, DNS and the wasm VMs' background tasks.

use std::cell::Cell;

use tokio::runtime::Handle;
use tokio::sync::watch;

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the worker this thread is (0-based), or `None` off the workers.
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// The default number of workers: the CPUs this process may run on (its affinity mask and
/// cgroup quota), as tokio and Envoy's `--concurrency` default count them.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// How far ahead a worker always has a timer due.
///
/// Tokio's timer wakes its own driver (a write to an eventfd, then one more `epoll_wait`)
/// whenever a timer is armed that is due before the earliest one the driver knows of. Without
/// a near timer, the earliest is a connection's idle timeout, so the timeouts every request
/// arms (the header read timeout, the per-try timeout) would cost those two system calls on
/// every request. With a timer always due within this horizon, they cost them once a horizon.
const TIMER_HORIZON: std::time::Duration = std::time::Duration::from_secs(1);

/// Keep a timer due within [`TIMER_HORIZON`] on this worker, forever.
async fn keep_a_timer_due() {
    let mut tick = tokio::time::interval(TIMER_HORIZON);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// The running workers. Dropping this stops them; connections still open on them are closed.
pub struct Workers {
    handles: Vec<Handle>,
    stop: watch::Sender<bool>,
}

impl Workers {
    /// Start `count` workers (at least one), named `weir-worker-N`.
    pub fn start(count: usize) -> std::io::Result<Workers> {
        let (stop, _) = watch::channel(false);
        let mut handles = Vec::new();
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let mut stopped = stop.subscribe();
            std::thread::Builder::new()
                .name(format!("weir-worker-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(Some(index)));
                    weir_wasm_host::set_stream_thread_number(index);
                    runtime.block_on(async {
                        tokio::select! {
                            () = crate::flag_set(&mut stopped) => {}
                            () = keep_a_timer_due() => {}
                        }
                    });
                    // Dropping the runtime here cancels the tasks left on this worker.
                })?;
        }
        Ok(Workers { handles, stop })
    }

    /// Number of workers.
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// The runtimes of the workers, to spawn a task on each.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // No join: the last reference may be dropped on a worker itself.
        let _ = self.stop.send(true);
    }
}

/// One value per worker plus one for the other threads (the control thread's health checks,
/// tests), so a worker uses only its own: its own upstream connection pools, as in Envoy.
pub struct PerWorker<T> {
    slots: Box<[T]>,
}

impl<T> PerWorker<T> {
    /// `workers + 1` values made by `make`.
    pub fn new(workers: usize, make: impl FnMut() -> T) -> PerWorker<T> {
        let mut make = make;
        PerWorker {
            slots: (0..=workers).map(|_| make()).collect(),
        }
    }

    /// This thread's value: its worker's, or the shared one off the workers (or on a worker
    /// of another gateway with more workers, in tests).
    pub fn get(&self) -> &T {
        let slot = current().map_or(0, |w| w + 1);
        self.slots.get(slot).unwrap_or(&self.slots[0])
    }

    /// Every value.
    pub fn all(&self) -> &[T] {
        &self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::{PerWorker, Workers, current};

    #[tokio::test]
    async fn each_worker_runs_its_tasks_on_its_own_thread() {
        let workers = Workers::start(2).unwrap();
        assert_eq!(workers.count(), 2);
        let mut seen = Vec::new();
        for (i, handle) in workers.handles().iter().enumerate() {
            let (index, name) = handle
                .spawn(async {
                    tokio::task::yield_now().await;
                    (current(), std::thread::current().name().map(str::to_string))
                })
                .await
                .unwrap();
            assert_eq!(index, Some(i));
            seen.push(name.unwrap());
        }
        assert_eq!(seen, ["weir-worker-0", "weir-worker-1"]);
        assert_eq!(current(), None, "the test's thread is not a worker");
    }

    #[tokio::test]
    async fn a_worker_gets_its_own_slot_and_others_share_slot_zero() {
        let mut next = 0;
        let per = std::sync::Arc::new(PerWorker::new(2, || {
            next += 1;
            next
        }));
        assert_eq!(per.all(), [1, 2, 3]);
        assert_eq!(*per.get(), 1);
        let workers = Workers::start(2).unwrap();
        for (i, handle) in workers.handles().iter().enumerate() {
            let per = per.clone();
            let got = handle.spawn(async move { *per.get() }).await.unwrap();
            assert_eq!(got, i + 2);
        }
    }

    #[tokio::test]
    async fn dropping_the_workers_cancels_their_tasks() {
        let workers = Workers::start(1).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = workers.handles()[0].spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        drop(workers);
        // The sender is dropped with the cancelled task.
        assert!(rx.await.is_err());
        assert!(task.await.unwrap_err().is_cancelled());
    }
}
