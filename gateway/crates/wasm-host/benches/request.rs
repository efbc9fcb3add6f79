//! Per-request cost of the filter chain: 0, 1 and 3 no-op filters, and one header-mutating
//! filter. A request is: request headers → response headers → finish, for every filter.

use std::sync::Arc;

use criterion::{Criterion, criterion_group};
use weir_wasm_host::{FailPolicy, Plugin, ResponseHead, StreamInfo};

#[allow(dead_code)]
#[path = "../tests/all/support.rs"]
mod support;

fn run(rt: &tokio::runtime::Runtime, chain: &[Arc<Plugin>], info: &Arc<StreamInfo>) {
    rt.block_on(async {
        let mut head = support::request("/bench", &[("user-agent", "bench"), ("accept", "*/*")]);
        let mut streams: Vec<_> = chain.iter().map(|p| p.new_stream(info.clone())).collect();
        for s in &mut streams {
            let d = s.on_request_headers(&mut head, true).await;
            assert_eq!(d, weir_wasm_host::Decision::Continue);
        }
        let mut resp = Arc::new(ResponseHead::default());
        for s in streams.iter_mut().rev() {
            s.on_response_headers(&mut resp, true).await;
        }
        for s in &mut streams {
            s.finish();
        }
        std::hint::black_box((head, resp));
    });
}

type Chains = Vec<(&'static str, Vec<Arc<Plugin>>)>;

fn chains() -> Chains {
    let env = support::TestEnv::new();
    let engine = support::engine(1);
    let noop = |i: usize| {
        support::plugin(
            &engine,
            &env,
            "bench",
            &format!("bench-noop-{i}"),
            "",
            FailPolicy::Closed,
        )
    };
    vec![
        ("0 filters", vec![]),
        ("1 no-op filter", vec![noop(0)]),
        ("3 no-op filters", vec![noop(1), noop(2), noop(3)]),
        (
            "1 header-mutating filter",
            vec![support::plugin(
                &engine,
                &env,
                "bench",
                "bench-mutate",
                "mutate",
                FailPolicy::Closed,
            )],
        ),
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let info = support::info();
    let chains = chains();
    let mut group = c.benchmark_group("request");
    for (name, chain) in &chains {
        group.bench_function(*name, |b| b.iter(|| run(&rt, chain, &info)));
    }
    group.finish();
}

criterion_group!(benches, bench);

/// `WEIR_BENCH_REQUESTS=N WEIR_BENCH_CHAIN=NAME` runs N requests through one chain without
/// criterion, for instruction counts that repeat exactly: run it under
/// `valgrind --tool=callgrind` with two values of N; the difference divided by the difference
/// of N is the cost of one request.
fn main() {
    let Ok(n) = std::env::var("WEIR_BENCH_REQUESTS") else {
        benches();
        Criterion::default().configure_from_args().final_summary();
        return;
    };
    let n: usize = n.parse().expect("WEIR_BENCH_REQUESTS is a number");
    let wanted = std::env::var("WEIR_BENCH_CHAIN").unwrap_or_else(|_| "1 no-op filter".into());
    let rt = runtime();
    let _guard = rt.enter();
    let info = support::info();
    let chains = chains();
    let (_, chain) = chains
        .iter()
        .find(|(name, _)| *name == wanted)
        .expect("WEIR_BENCH_CHAIN names a chain of the bench");
    for _ in 0..n {
        run(&rt, chain, &info);
    }
}
