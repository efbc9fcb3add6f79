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

use http::HeaderMap;

use crate::state::StreamCtx;
use crate::stream::{RequestHead, ResponseHead, StreamInfo};

/// Objects kept per list and thread: more than the requests a worker has in flight at once
/// in most deployments; beyond it, objects are freed.
pub const KEEP: usize = 256;

/// A head whose path or authority took more room than this is not kept: a rare huge request
/// line should not pin its memory in every list.
const KEEP_STRING_CAPACITY: usize = 4096;

struct Lists {
    /// Boxed: a stream holds its context in a box, which is what is reused.
    #[allow(clippy::vec_box)]
    contexts: Vec<Box<StreamCtx>>,
    request_heads: Vec<Arc<RequestHead>>,
    response_heads: Vec<Arc<ResponseHead>>,
    infos: Vec<Arc<StreamInfo>>,
}

thread_local! {
    static LISTS: RefCell<Lists> = const {
        RefCell::new(Lists {
            contexts: Vec::new(),
            request_heads: Vec::new(),
            response_heads: Vec::new(),
            infos: Vec::new(),
        })
    };
}

fn with<R>(f: impl FnOnce(&mut Lists) -> R) -> Option<R> {
    // `try_with`: during thread teardown the lists may be gone; then nothing is pooled.
    LISTS
        .try_with(|l| l.try_borrow_mut().ok().map(|mut l| f(&mut l)))
        .ok()
        .flatten()
}

fn keep<T>(list: &mut Vec<T>, item: T) {
    if list.len() < KEEP {
        list.push(item);
    }
}

/// A request head to fill: its strings are empty but keep their capacity.
pub fn request_head() -> Arc<RequestHead> {
    with(|l| l.request_heads.pop())
        .flatten()
        .unwrap_or_default()
}

/// A response head to fill, empty.
pub fn response_head() -> Arc<ResponseHead> {
    with(|l| l.response_heads.pop())
        .flatten()
        .unwrap_or_default()
}

/// A stream facts record to fill (overwrite every field: addresses and times are left from its
/// last use).
pub fn stream_info() -> Arc<StreamInfo> {
    with(|l| l.infos.pop()).flatten().unwrap_or_default()
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
    with(|l| keep(&mut l.request_heads, head));
}

/// Give a response head back: kept if this was its last reference.
pub fn give_response_head(mut head: Arc<ResponseHead>) {
    let Some(h) = Arc::get_mut(&mut head) else {
        return;
    };
    h.headers = HeaderMap::new();
    h.status = http::StatusCode::OK;
    with(|l| keep(&mut l.response_heads, head));
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
    with(|l| keep(&mut l.infos, info));
}

/// A stream context from the list (reset by [`give_context`]), if there is one.
pub(crate) fn context() -> Option<Box<StreamCtx>> {
    with(|l| l.contexts.pop()).flatten()
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
    with(|l| keep(&mut l.contexts, ctx));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_given_back_is_reused_empty_with_its_room() {
        let mut head = request_head();
        let h = Arc::get_mut(&mut head).unwrap();
        h.path.push_str("/a/long/path/to/keep/room/for");
        h.headers.insert("x-a", "1".parse().unwrap());
        let room = h.path.capacity();
        let addr = Arc::as_ptr(&head);
        give_request_head(head);
        let again = request_head();
        assert_eq!(Arc::as_ptr(&again), addr);
        assert!(again.path.is_empty() && again.headers.is_empty());
        assert_eq!(again.path.capacity(), room);
    }

    #[test]
    fn stream_facts_given_back_let_go_of_what_they_referenced() {
        let id = http::HeaderValue::from_maybe_shared(bytes::Bytes::from_static(b"id-1")).unwrap();
        let route: Arc<str> = Arc::from("route-a");
        let mut info = stream_info();
        let i = Arc::get_mut(&mut info).unwrap();
        i.request_id = Some(id);
        i.route_name = route.clone();
        give_stream_info(info);
        assert_eq!(
            Arc::strong_count(&route),
            1,
            "the pooled record let go of the name"
        );
        let again = stream_info();
        assert!(again.request_id.is_none());
        assert_eq!(&*again.route_name, "");
    }

    #[test]
    fn a_head_with_a_huge_path_is_not_kept() {
        let mut head = request_head();
        Arc::get_mut(&mut head).unwrap().path = "x".repeat(KEEP_STRING_CAPACITY + 1);
        give_request_head(head);
        assert!(request_head().path.capacity() <= KEEP_STRING_CAPACITY);
    }

    #[test]
    fn a_shared_head_is_not_kept() {
        let head = response_head();
        let other = head.clone();
        let addr = Arc::as_ptr(&head);
        give_response_head(head);
        assert_ne!(Arc::as_ptr(&response_head()), addr);
        assert_eq!(other.status, http::StatusCode::OK);
    }
}
