//! Numbering of the threads that run streams: each gets its own VM replica and its own shard
//! of hot counters, so worker threads do not share cache lines on the request path.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

thread_local! {
    static STREAM_NUMBER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// This thread's number among the threads that run streams: the one given by
/// [`set_stream_thread_number`] (a gateway numbers its workers 0, 1, ...), else 0 for the
/// first thread that started a stream, 1 for the next, and so on. Threads that never start a
/// stream (the one that starts VMs, the blocking pool) take no number.
pub(crate) fn stream_thread_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    STREAM_NUMBER.with(|n| match n.get() {
        Some(number) => number,
        None => {
            let number = NEXT.fetch_add(1, Ordering::Relaxed);
            n.set(Some(number));
            number
        }
    })
}

/// Number this thread for picking VM replicas: with one replica per worker thread and each
/// worker numbered by its index, every worker has a replica of its own.
pub fn set_stream_thread_number(number: usize) {
    STREAM_NUMBER.with(|n| n.set(Some(number)));
}

/// This thread's number for picking a counter shard (every thread that counts takes one).
fn shard_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    NUMBER.with(|n| *n)
}

/// A counter that threads add to in shards of their own cache line; reading sums the shards.
#[derive(Debug)]
pub struct ShardedCounter {
    shards: Box<[Padded]>,
}

/// One shard, alone in its cache line (128 bytes: adjacent-line prefetching pairs lines).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

impl Default for ShardedCounter {
    /// As many shards as CPUs (at most 64).
    fn default() -> Self {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get().min(64));
        Self {
            shards: (0..n).map(|_| Padded::default()).collect(),
        }
    }
}

impl ShardedCounter {
    /// Add `n` in this thread's shard.
    pub fn add(&self, n: u64) {
        let shard = &self.shards[shard_number() % self.shards.len()];
        shard.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The total over all shards.
    pub fn get(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::{ShardedCounter, set_stream_thread_number, stream_thread_number};

    #[test]
    fn each_thread_keeps_its_own_number() {
        let here = stream_thread_number();
        assert_eq!(stream_thread_number(), here, "stable within a thread");
        let others: Vec<usize> = (0..3)
            .map(|_| std::thread::spawn(stream_thread_number).join().unwrap())
            .collect();
        let mut all = others.clone();
        all.push(here);
        all.sort_unstable();
        all.dedup();
        assert_eq!(
            all.len(),
            4,
            "every thread has a number of its own: {others:?} and {here}"
        );
    }

    #[test]
    fn a_thread_numbered_by_its_owner_keeps_that_number() {
        let got = std::thread::spawn(|| {
            set_stream_thread_number(7);
            stream_thread_number()
        })
        .join()
        .unwrap();
        assert_eq!(got, 7);
    }

    #[test]
    fn a_sharded_counter_sums_what_every_thread_added() {
        let c = std::sync::Arc::new(ShardedCounter::default());
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let c = c.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| c.add(i + 1)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(c.get(), 1000 * (1 + 2 + 3 + 4));
    }
}
