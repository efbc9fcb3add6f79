//! Per-thread free lists of what every filtered request needs: stream contexts, request and
//! response heads and stream facts. A request is served on one worker thread from
//! start to end, so the objects it frees are there for the next request on that thread, and the
//! filter path allocates almost nothing per request.
//!
//! Taking from an empty list allocates; giving back an object somebody else still references
//! (an `Arc` that is not unique) just drops that reference, so a missed or early give-back
//! costs an allocation, never correctness. Each list keeps at most [`KEEP`] objects.

use std::cell::RefCell;
use std::sync::Arc;
use std::thread::LocalKey;

use http::HeaderMap;

use crate::state::StreamCtx;
use crate::stream::{RequestHead, ResponseHead, StreamInfo};

/// Objects kept per list and thread: more than the requests a worker has in flight at once
/// in most deployments; beyond it, objects are freed.
pub const KEEP: usize = 256;

/// A head whose path or authority took more room than this is not kept: a rare huge request
/// line should not pin its memory in every list.
const KEEP_STRING_CAPACITY: usize = 4096;

/// A per-thread free list of at most [`KEEP`] objects; declare it in a `thread_local!` and
/// use it with [`take_from`] and [`give_to`]. The gateway keeps its own lists this way too.
pub struct FreeList<T>(RefCell<Vec<T>>);

impl<T> FreeList<T> {
    /// An empty list.
    pub const fn new() -> Self {
        Self(RefCell::new(Vec::new()))
    }
}

impl<T> Default for FreeList<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// An object from this thread's `list`, if it has one. During thread teardown the list may be
/// gone, and while it is in use (a drop giving back from inside a give-back) it is skipped:
/// then the caller allocates.
pub fn take_from<T>(list: &'static LocalKey<FreeList<T>>) -> Option<T> {
    list.try_with(|l| l.0.try_borrow_mut().ok()?.pop())
        .ok()
        .flatten()
}

/// Keep `item` in this thread's `list`, unless the list is full or unavailable (then it is
/// dropped).
pub fn give_to<T>(list: &'static LocalKey<FreeList<T>>, item: T) {
    let _ = list.try_with(|l| {
        if let Ok(mut l) = l.0.try_borrow_mut()
            && l.len() < KEEP
        {
            l.push(item);
        }
    });
}

thread_local! {
    static CONTEXTS: FreeList<Box<StreamCtx>> = const { FreeList::new() };
    static REQUEST_HEADS: FreeList<Arc<RequestHead>> = const { FreeList::new() };
    static RESPONSE_HEADS: FreeList<Arc<ResponseHead>> = const { FreeList::new() };
    static INFOS: FreeList<Arc<StreamInfo>> = const { FreeList::new() };
}

/// A request head filled by `fill`, in a head a finished request of this thread left (its
/// strings come empty but keep their room).
pub fn request_head(fill: impl FnOnce(&mut RequestHead)) -> Arc<RequestHead> {
    filled(take_from(&REQUEST_HEADS), fill)
}

/// A response head filled by `fill`, reused like [`request_head`]'s.
pub fn response_head(fill: impl FnOnce(&mut ResponseHead)) -> Arc<ResponseHead> {
    filled(take_from(&RESPONSE_HEADS), fill)
}

/// Stream facts, reused like [`request_head`]'s. `fill` must set every field: addresses and
/// times are left from the record's last use.
pub fn stream_info(fill: impl FnOnce(&mut StreamInfo)) -> Arc<StreamInfo> {
    filled(take_from(&INFOS), fill)
}

/// `reused` (only unique objects are kept, so it is writable) or a new default, filled.
fn filled<T: Default>(reused: Option<Arc<T>>, fill: impl FnOnce(&mut T)) -> Arc<T> {
    let mut item = reused.unwrap_or_default();
    match Arc::get_mut(&mut item) {
        Some(it) => fill(it),
        None => {
            let mut it = T::default();
            fill(&mut it);
            item = Arc::new(it);
        }
    }
    item
}

/// Give a request head back: kept if this was its last reference.
pub fn give_request_head(mut head: Arc<RequestHead>) {
    let Some(h) = Arc::get_mut(&mut head) else {
        return;
    };
    if h.path.capacity() > KEEP_STRING_CAPACITY || h.authority.capacity() > KEEP_STRING_CAPACITY {
        return;
    }
    // The headers are freed: a map cannot be copied into without hashing every name again,
    // which costs more than allocating a new one.
    h.headers = HeaderMap::new();
    h.authority.clear();
    h.path.clear();
    h.method = http::Method::GET;
    h.scheme = "http".into();
    give_to(&REQUEST_HEADS, head);
}

/// Give a response head back: kept if this was its last reference.
pub fn give_response_head(mut head: Arc<ResponseHead>) {
    let Some(h) = Arc::get_mut(&mut head) else {
        return;
    };
    h.headers = HeaderMap::new();
    h.status = http::StatusCode::OK;
    give_to(&RESPONSE_HEADS, head);
}

/// Give stream facts back: kept if this was their last reference.
pub fn give_stream_info(mut info: Arc<StreamInfo>) {
    let Some(i) = Arc::get_mut(&mut info) else {
        return;
    };
    // Drop what points elsewhere: a request id read off the wire shares the connection's read
    // buffer, and names keep an old route table's strings alive.
    i.request_id = None;
    i.tls = None;
    i.route_name = crate::stream::empty_name();
    i.cluster_name = crate::stream::empty_name();
    i.listener_name = crate::stream::empty_name();
    i.virtual_host_name = crate::stream::empty_name();
    give_to(&INFOS, info);
}

/// A stream context from the list (reset by [`give_context`]), if there is one.
pub(crate) fn context() -> Option<Box<StreamCtx>> {
    take_from(&CONTEXTS)
}

/// Give a stream context back: what it references is given back too, the rest reset.
pub(crate) fn give_context(mut ctx: Box<StreamCtx>) {
    give_stream_info(std::mem::replace(
        &mut ctx.info,
        crate::stream::empty_info(),
    ));
    if let Some(h) = ctx.request.take() {
        give_request_head(h);
    }
    if let Some(h) = ctx.response.take() {
        give_response_head(h);
    }
    ctx.reset();
    give_to(&CONTEXTS, ctx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_given_back_is_reused_empty_with_its_room() {
        let mut room = 0;
        let head = request_head(|h| {
            h.path.push_str("/a/long/path/to/keep/room/for");
            h.headers.insert("x-a", "1".parse().unwrap());
            room = h.path.capacity();
        });
        let addr = Arc::as_ptr(&head);
        give_request_head(head);
        let again = request_head(|_| {});
        assert_eq!(Arc::as_ptr(&again), addr);
        assert!(again.path.is_empty() && again.headers.is_empty());
        assert_eq!(again.path.capacity(), room);
    }

    #[test]
    fn stream_facts_given_back_let_go_of_what_they_referenced() {
        let id = http::HeaderValue::from_maybe_shared(bytes::Bytes::from_static(b"id-1")).unwrap();
        let route: Arc<str> = Arc::from("route-a");
        let info = stream_info(|i| {
            i.request_id = Some(id);
            i.route_name = route.clone();
        });
        give_stream_info(info);
        assert_eq!(
            Arc::strong_count(&route),
            1,
            "the pooled record let go of the name"
        );
        let again = stream_info(|_| {});
        assert!(again.request_id.is_none());
        assert_eq!(&*again.route_name, "");
    }

    #[test]
    fn a_head_with_a_huge_path_is_not_kept() {
        let head = request_head(|h| h.path = "x".repeat(KEEP_STRING_CAPACITY + 1));
        give_request_head(head);
        assert!(request_head(|_| {}).path.capacity() <= KEEP_STRING_CAPACITY);
    }

    #[test]
    fn a_shared_head_is_not_kept() {
        let head = response_head(|_| {});
        let other = head.clone();
        let addr = Arc::as_ptr(&head);
        give_response_head(head);
        assert_ne!(Arc::as_ptr(&response_head(|_| {})), addr);
        assert_eq!(other.status, http::StatusCode::OK);
    }
}
