//! The floor under a filter's cost: the seven callbacks of one request (`on_context_create`,
//! request headers, response headers, response body, `on_log`, `on_done`, `on_delete`) entered
//! straight through wasmtime, in the bench guest (a no-op filter written with the `proxy-wasm`
//! crate), with nothing of Weir's host around them: no stream state, no heads, no locks. The
//! engine is configured as Weir's (epoch interruption on, optimised for speed), and every
//! host import answers 0.
//!
//! Whatever a host does, a no-op filter cannot cost less than this per request.

use criterion::{Criterion, criterion_group, criterion_main};
use wasmtime::{Config, Engine, Instance, Linker, Module, OptLevel, Store, TypedFunc};

#[allow(dead_code)]
#[path = "../tests/all/support.rs"]
mod support;

struct Guest {
    store: Store<()>,
    create: TypedFunc<(i32, i32), ()>,
    request_headers: TypedFunc<(i32, i32, i32), i32>,
    response_headers: TypedFunc<(i32, i32, i32), i32>,
    response_body: TypedFunc<(i32, i32, i32), i32>,
    log: TypedFunc<i32, ()>,
    done: TypedFunc<i32, i32>,
    delete: TypedFunc<i32, ()>,
    next_id: i32,
}

impl Guest {
    fn new() -> Guest {
        let mut cfg = Config::new();
        cfg.epoch_interruption(true);
        cfg.cranelift_opt_level(OptLevel::Speed);
        let engine = Engine::new(&cfg).expect("engine");
        let module = Module::new(&engine, &support::guest("bench")[..]).expect("module");
        let mut store = Store::new(&engine, ());
        store.set_epoch_deadline(u64::MAX / 2);
        let mut linker = Linker::new(&engine);
        linker
            .define_unknown_imports_as_default_values(&mut store, &module)
            .expect("stub imports");
        let instance: Instance = linker.instantiate(&mut store, &module).expect("instance");
        if let Ok(init) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
            init.call(&mut store, ()).expect("_initialize");
        }
        let f = |store: &mut Store<()>, name: &str| {
            instance
                .get_func(&mut *store, name)
                .unwrap_or_else(|| panic!("export {name}"))
        };
        let create = f(&mut store, "proxy_on_context_create")
            .typed(&store)
            .unwrap();
        let vm_start: TypedFunc<(i32, i32), i32> =
            f(&mut store, "proxy_on_vm_start").typed(&store).unwrap();
        let configure: TypedFunc<(i32, i32), i32> =
            f(&mut store, "proxy_on_configure").typed(&store).unwrap();
        let mut guest = Guest {
            create,
            request_headers: f(&mut store, "proxy_on_request_headers")
                .typed(&store)
                .unwrap(),
            response_headers: f(&mut store, "proxy_on_response_headers")
                .typed(&store)
                .unwrap(),
            response_body: f(&mut store, "proxy_on_response_body")
                .typed(&store)
                .unwrap(),
            log: f(&mut store, "proxy_on_log").typed(&store).unwrap(),
            done: f(&mut store, "proxy_on_done").typed(&store).unwrap(),
            delete: f(&mut store, "proxy_on_delete").typed(&store).unwrap(),
            store,
            next_id: 2,
        };
        guest.create.call(&mut guest.store, (1, 0)).unwrap();
        assert_eq!(vm_start.call(&mut guest.store, (1, 0)).unwrap(), 1);
        assert_eq!(configure.call(&mut guest.store, (1, 0)).unwrap(), 1);
        guest
    }

    /// One request through the filter: the callbacks Envoy (and Weir) make, in order.
    fn request(&mut self) {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(2);
        let s = &mut self.store;
        self.create.call(&mut *s, (id, 1)).unwrap();
        let a = self.request_headers.call(&mut *s, (id, 6, 1)).unwrap();
        let b = self.response_headers.call(&mut *s, (id, 4, 0)).unwrap();
        let c = self.response_body.call(&mut *s, (id, 13, 1)).unwrap();
        assert_eq!((a, b, c), (0, 0, 0), "the no-op filter continues");
        self.log.call(&mut *s, id).unwrap();
        self.done.call(&mut *s, id).unwrap();
        self.delete.call(&mut *s, id).unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let mut guest = Guest::new();
    c.bench_function(
        "guest callbacks of one request (no-op filter, no host)",
        |b| b.iter(|| guest.request()),
    );
}

criterion_group!(benches, bench);

criterion_main!(benches);
