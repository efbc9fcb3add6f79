//! Process-wide shared data and shared queues, keyed by vm_id as in Envoy.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;
use tokio::sync::mpsc::WeakUnboundedSender;

use crate::plugin::BgEvent;
use crate::types::Status;

/// One vm_id's data: key → (value, CAS).
type DataMap = HashMap<Vec<u8>, (Bytes, u32)>;

/// Key-value store shared by all VMs with the same vm_id, with compare-and-swap.
#[derive(Default)]
pub(crate) struct SharedData {
    maps: Mutex<HashMap<String, DataMap>>,
    next_cas: AtomicU32,
}

pub(crate) fn shared_data() -> &'static SharedData {
    static DATA: OnceLock<SharedData> = OnceLock::new();
    DATA.get_or_init(SharedData::default)
}

impl SharedData {
    fn new_cas(&self) -> u32 {
        loop {
            let c = self
                .next_cas
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if c != 0 {
                return c;
            }
        }
    }

    /// The value and CAS of `key`, or `NOT_FOUND`.
    pub(crate) fn get(&self, vm_id: &str, key: &[u8]) -> Result<(Bytes, u32), Status> {
        let maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        maps.get(vm_id)
            .and_then(|m| m.get(key))
            .cloned()
            .ok_or(Status::NotFound)
    }

    /// Set `key`. `cas` 0 writes unconditionally; a non-zero `cas` must match the current one when
    /// the key exists (`CAS_MISMATCH` otherwise). Every write assigns a new CAS.
    pub(crate) fn set(
        &self,
        vm_id: &str,
        key: &[u8],
        value: Bytes,
        cas: u32,
    ) -> Result<(), Status> {
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let map = maps.entry(vm_id.to_owned()).or_default();
        match map.get_mut(key) {
            Some(entry) => {
                if cas != 0 && cas != entry.1 {
                    return Err(Status::CasMismatch);
                }
                *entry = (value, self.new_cas());
            }
            None => {
                let c = self.new_cas();
                map.insert(key.to_vec(), (value, c));
            }
        }
        Ok(())
    }
}

struct Queue {
    items: VecDeque<Bytes>,
    registrant: Option<(WeakUnboundedSender<BgEvent>, u32)>,
}

/// Shared queues, keyed by (vm_id, name).
#[derive(Default)]
pub(crate) struct SharedQueues {
    inner: Mutex<QueuesInner>,
}

#[derive(Default)]
struct QueuesInner {
    by_name: HashMap<(String, String), u32>,
    queues: HashMap<u32, Queue>,
    next_id: u32,
}

pub(crate) fn shared_queues() -> &'static SharedQueues {
    static QUEUES: OnceLock<SharedQueues> = OnceLock::new();
    QUEUES.get_or_init(SharedQueues::default)
}

/// Most items a queue holds; `enqueue` past it answers `INTERNAL_FAILURE`.
const MAX_QUEUE_ITEMS: usize = 100_000;

impl SharedQueues {
    /// Register (or find) the queue `name` of `vm_id`; the registrant is woken with
    /// `proxy_on_queue_ready` on enqueue. A queue whose registrant VM is gone gets the new one.
    pub(crate) fn register(
        &self,
        vm_id: &str,
        name: &str,
        wake: WeakUnboundedSender<BgEvent>,
        context_id: u32,
    ) -> u32 {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (vm_id.to_owned(), name.to_owned());
        if let Some(&id) = inner.by_name.get(&key) {
            if let Some(q) = inner.queues.get_mut(&id) {
                let alive = q
                    .registrant
                    .as_ref()
                    .is_some_and(|(s, _)| s.upgrade().is_some());
                if !alive {
                    q.registrant = Some((wake, context_id));
                }
            }
            return id;
        }
        inner.next_id += 1;
        let id = inner.next_id;
        inner.by_name.insert(key, id);
        inner.queues.insert(
            id,
            Queue {
                items: VecDeque::new(),
                registrant: Some((wake, context_id)),
            },
        );
        id
    }

    /// The id of queue `name` of `vm_id`, or `NOT_FOUND`.
    pub(crate) fn resolve(&self, vm_id: &str, name: &str) -> Result<u32, Status> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .by_name
            .get(&(vm_id.to_owned(), name.to_owned()))
            .copied()
            .ok_or(Status::NotFound)
    }

    /// Append to queue `id` and wake its registrant.
    pub(crate) fn enqueue(&self, id: u32, data: Bytes) -> Result<(), Status> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let q = inner.queues.get_mut(&id).ok_or(Status::NotFound)?;
        if q.items.len() >= MAX_QUEUE_ITEMS {
            return Err(Status::InternalFailure);
        }
        q.items.push_back(data);
        if let Some((wake, ctx)) = &q.registrant
            && let Some(tx) = wake.upgrade()
        {
            let _ = tx.send(BgEvent::QueueReady {
                context_id: *ctx,
                queue_id: id,
            });
        }
        Ok(())
    }

    /// Take the oldest item of queue `id`: `NOT_FOUND` for no queue, `EMPTY` for no item.
    pub(crate) fn dequeue(&self, id: u32) -> Result<Bytes, Status> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let q = inner.queues.get_mut(&id).ok_or(Status::NotFound)?;
        q.items.pop_front().ok_or(Status::Empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_semantics() {
        let d = SharedData::default();
        assert_eq!(d.get("vm", b"k"), Err(Status::NotFound));
        // A non-zero CAS on a missing key is not checked.
        d.set("vm", b"k", Bytes::from_static(b"1"), 77).unwrap();
        let (v, cas) = d.get("vm", b"k").unwrap();
        assert_eq!(&v[..], b"1");
        assert_ne!(cas, 0);
        assert_eq!(
            d.set("vm", b"k", Bytes::from_static(b"2"), cas + 1),
            Err(Status::CasMismatch)
        );
        d.set("vm", b"k", Bytes::from_static(b"2"), cas).unwrap();
        let (v, cas2) = d.get("vm", b"k").unwrap();
        assert_eq!(&v[..], b"2");
        assert_ne!(cas2, cas);
        // CAS 0 writes unconditionally.
        d.set("vm", b"k", Bytes::from_static(b"3"), 0).unwrap();
        assert_eq!(&d.get("vm", b"k").unwrap().0[..], b"3");
        // Other vm_ids do not see it.
        assert_eq!(d.get("other", b"k"), Err(Status::NotFound));
    }

    #[test]
    fn queues() {
        let q = SharedQueues::default();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        assert_eq!(q.resolve("vm", "q"), Err(Status::NotFound));
        let id = q.register("vm", "q", tx.downgrade(), 1);
        assert_eq!(q.resolve("vm", "q"), Ok(id));
        assert_eq!(q.dequeue(id), Err(Status::Empty));
        assert_eq!(q.dequeue(id + 100), Err(Status::NotFound));
        q.enqueue(id, Bytes::from_static(b"a")).unwrap();
        assert_eq!(&q.dequeue(id).unwrap()[..], b"a");
    }
}
