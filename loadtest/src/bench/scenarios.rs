//! The scenarios: what each starts, which loads it runs, and what it reports.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::BenchOpts;
use super::contender::{self, Kind, Launch, Running};
use super::install;
use super::process::{Proc, Spawn, free_ports, loopback};
use super::results::{Context, Row, ScenarioResult, Section};
use super::spec::{Backend, ProxySpec, TlsSpec, WasmFilter, many_routes};
use crate::generator::{IdleReport, Protocol, Target};
use crate::report::{RunReport, fmt_rate};
use crate::tls::{PkiFiles, TestPki};

/// One load, as run against every contender.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Protocol.
    pub protocol: Protocol,
    /// Connections.
    pub connections: usize,
    /// HTTP/2 streams per connection.
    pub streams: usize,
    /// A new connection (full handshake) per request.
    pub per_request: bool,
    /// Open-loop rate; `None` for a closed loop.
    pub rate: Option<f64>,
    /// The request (when there is no targets file).
    pub target: Target,
    /// Requests to rotate through.
    pub targets_file: Option<PathBuf>,
    /// Extra request headers, `NAME: VALUE`.
    pub headers: Vec<String>,
    /// Measured time.
    pub duration: Duration,
    /// Warm-up.
    pub warmup: Duration,
}

impl Plan {
    /// A closed-loop HTTP/1.1 plan for `GET path` with the options' connections and durations.
    pub fn new(opts: &BenchOpts, path: &str) -> Self {
        Self {
            protocol: Protocol::H1,
            connections: opts.connections,
            streams: 1,
            per_request: false,
            rate: None,
            target: Target {
                host: "localhost".into(),
                path: path.into(),
            },
            targets_file: None,
            headers: Vec::new(),
            duration: opts.duration,
            warmup: opts.warmup,
        }
    }

    /// One line saying what the plan runs.
    pub fn describe(&self) -> String {
        let mode = match self.rate {
            Some(r) => format!("open loop at {} req/s", fmt_rate(r)),
            None => "closed loop".into(),
        };
        let what = match &self.targets_file {
            Some(_) => "rotating targets".to_string(),
            None => format!("GET {}", self.target.path),
        };
        format!(
            "{} {mode}, {} connections{}{}, {what}, {:.0?} measured after {:.0?} warm-up per run",
            self.protocol.name(),
            self.connections,
            if self.streams > 1 {
                format!(" x {} streams", self.streams)
            } else {
                String::new()
            },
            if self.per_request {
                ", new connection (full handshake) per request"
            } else {
                ""
            },
            self.duration,
            self.warmup
        )
    }
}

/// The runner's state: options, work directory, binaries found, contenders skipped.
#[derive(Debug)]
pub struct Env {
    /// The options.
    pub opts: BenchOpts,
    exe: PathBuf,
    /// Work directory for configurations and logs.
    pub work: PathBuf,
    nproc: usize,
    binaries: HashMap<Kind, Result<PathBuf, String>>,
    skipped: Vec<String>,
    pki: Option<PkiFiles>,
    command: String,
    load_before: String,
}

/// The first three fields of `/proc/loadavg`.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits up to `limit` for the 1-minute load average to fall below 1.
async fn wait_quiet(limit: Duration) {
    let start = Instant::now();
    let mut told = false;
    loop {
        let one: f64 = load_average()
            .split_whitespace()
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0.0);
        if one < 1.0 {
            if told {
                eprintln!("weir-bench: quiet after {:.0?}", start.elapsed());
            }
            return;
        }
        if start.elapsed() >= limit {
            eprintln!(
                "weir-bench: the machine is still busy (load average {}); running anyway",
                load_average()
            );
            return;
        }
        if !told {
            eprintln!(
                "weir-bench: waiting up to {limit:?} for a quiet machine (load average {})",
                load_average()
            );
            told = true;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

impl Env {
    /// Makes the work directory.
    pub fn new(opts: BenchOpts) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
        let work = std::env::temp_dir().join(format!("weir-bench-{}", std::process::id()));
        std::fs::create_dir_all(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;
        let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
        let command = std::env::args()
            .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Self {
            opts,
            exe,
            work,
            nproc,
            binaries: HashMap::new(),
            skipped: Vec::new(),
            pki: None,
            command,
            load_before: load_average(),
        })
    }

    /// Removes the work directory unless asked to keep it.
    pub fn finish(&mut self) {
        if self.opts.keep_workdir {
            eprintln!(
                "weir-bench: configurations and logs kept in {}",
                self.work.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }

    fn selected(&self, kind: Kind) -> bool {
        self.opts.contenders.is_empty() || self.opts.contenders.contains(&kind)
    }

    /// Workers of every proxy: `--workers`, else one per CPU the proxies are pinned to (two
    /// workers on one pinned CPU would only take turns), else one per core.
    fn workers(&self) -> usize {
        self.opts.workers.unwrap_or_else(|| {
            self.opts
                .cpus_proxy
                .as_deref()
                .and_then(cpu_list_len)
                .unwrap_or(self.nproc)
        })
    }

    fn skip(&mut self, what: String) {
        eprintln!("weir-bench: skipping {what}");
        if !self.skipped.contains(&what) {
            self.skipped.push(what);
        }
    }

    fn weir_binary(&self) -> Result<PathBuf, String> {
        if let Some(p) = &self.opts.weir_bin {
            // Absolute: the proxies run in their own work directories.
            return match std::fs::canonicalize(p) {
                Ok(abs) if abs.is_file() => Ok(abs),
                _ => Err(format!("weir binary {} not found", p.display())),
            };
        }
        let mut candidates = Vec::new();
        if let Some(dir) = self.exe.parent() {
            candidates.push(dir.join("weir"));
        }
        if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
            candidates.push(Path::new(&t).join("release/weir"));
        }
        candidates.push(PathBuf::from("target/release/weir"));
        candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
            "weir binary not found (build it with `cargo build --release -p weir`, or pass --weir-bin)".to_string()
        })
    }

    /// The binary of `kind`, installing it when needed (once per run).
    fn binary(&mut self, kind: Kind) -> Result<PathBuf, String> {
        if let Some(found) = self.binaries.get(&kind) {
            return found.clone();
        }
        let found = match kind {
            Kind::Upstream => Ok(self.exe.clone()),
            Kind::Weir => self.weir_binary(),
            peer => install::locate(peer, !self.opts.no_install),
        };
        self.binaries.insert(kind, found.clone());
        found
    }

    fn pki(&mut self) -> Result<PkiFiles, String> {
        if let Some(p) = &self.pki {
            return Ok(p.clone());
        }
        let files = TestPki::generate()
            .and_then(|p| p.write_to(&self.work))
            .map_err(|e| e.to_string())?;
        self.pki = Some(files.clone());
        Ok(files)
    }

    fn context(&mut self, settings: String) -> Context {
        let run = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default()
        };
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_string();
        let o = &self.opts;
        let placement = match (&o.cpus_load, &o.cpus_upstream, &o.cpus_proxy) {
            (None, None, None) => format!(
                "not pinned: the generator, the upstream and the proxy share the same {} cores, so every figure is lower than on a machine with dedicated load generators",
                self.nproc
            ),
            (l, u, p) => {
                let s = |x: &Option<String>| x.clone().unwrap_or_else(|| "any".into());
                format!(
                    "pinned with taskset: generator CPUs {}, upstream CPUs {}, proxy CPUs {} (of {} cores)",
                    s(l),
                    s(u),
                    s(p),
                    self.nproc
                )
            }
        };
        let mut versions = Vec::new();
        for kind in Kind::ALL {
            if let Some(Ok(bin)) = self.binaries.get(&kind)
                && kind != Kind::Upstream
            {
                versions.push((kind.name().to_string(), install::version(kind, bin)));
            }
        }
        Context {
            date: run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            command: self.command.clone(),
            nproc: self.nproc,
            cpu,
            kernel: run("uname", &["-r"]),
            placement,
            versions,
            skipped: self.skipped.clone(),
            settings,
            load_average: format!("{} before, {} after", self.load_before, load_average()),
        }
    }

    fn settings(&self) -> String {
        format!(
            "{} rounds, contenders run in turn within each round; proxies: {} workers, keep-alive to the upstream, access logs {}{}",
            self.opts.rounds,
            self.workers(),
            if self.opts.access_log {
                "on (file)"
            } else {
                "off"
            },
            if self.opts.nice != 0 {
                format!("; every process at nice {}", self.opts.nice)
            } else {
                String::new()
            }
        )
    }

    /// Starts the benchmark upstream with `listeners` listeners (TLS with `tls`).
    async fn start_upstream(
        &mut self,
        name: &str,
        listeners: usize,
        tls: bool,
    ) -> Result<(Proc, Vec<SocketAddr>), String> {
        // The first upstream of a scenario marks its start: wait for quiet, note the load.
        if !tls {
            if !self.opts.wait_quiet.is_zero() {
                wait_quiet(self.opts.wait_quiet).await;
            }
            self.load_before = load_average();
        }
        let addrs: Vec<SocketAddr> = free_ports(listeners)?.into_iter().map(loopback).collect();
        let mut args: Vec<String> = vec!["upstream".into()];
        for a in &addrs {
            args.extend(["--listen".into(), a.to_string()]);
        }
        let mut probe_tls = None;
        if tls {
            let pki = self.pki()?;
            args.extend([
                "--tls-cert".into(),
                pki.cert.display().to_string(),
                "--tls-key".into(),
                pki.key.display().to_string(),
            ]);
            probe_tls =
                Some(crate::tls::client_config_from_file(&pki.ca, &[]).map_err(|e| e.to_string())?);
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut spawn = Spawn::new(name, &self.exe, &argv, &self.work);
        spawn.cpus = self.opts.cpus_upstream.clone();
        spawn.nice = self.opts.nice;
        let mut proc = spawn.start()?;
        for a in &addrs {
            let probe = contender::probe_for(
                *a,
                &Target {
                    host: "localhost".into(),
                    path: "/".into(),
                },
                probe_tls.clone(),
            );
            contender::wait_ready(&probe, &mut proc, Duration::from_secs(10)).await?;
        }
        Ok((proc, addrs))
    }

    /// Starts every selected contender but the upstream, each with `make_spec(listen, admin)`;
    /// one that cannot be installed or started is skipped with a message.
    async fn start_contenders(
        &mut self,
        scenario: &str,
        make_spec: impl Fn(SocketAddr, SocketAddr) -> ProxySpec,
        probe: &Target,
    ) -> Vec<Running> {
        let mut running = Vec::new();
        let kinds: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| *k != Kind::Upstream && self.selected(*k))
            .collect();
        for kind in kinds {
            let binary = match self.binary(kind) {
                Ok(b) => b,
                Err(e) => {
                    self.skip(format!("{}: {e}", kind.name()));
                    continue;
                }
            };
            let ports = match free_ports(2) {
                Ok(p) => p,
                Err(e) => {
                    self.skip(format!("{}: {e}", kind.name()));
                    continue;
                }
            };
            let spec = make_spec(loopback(ports[0]), loopback(ports[1]));
            let tls = match &spec.tls {
                Some(_) => match self.pki().and_then(|p| {
                    crate::tls::client_config_from_file(&p.ca, &[]).map_err(|e| e.to_string())
                }) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        self.skip(format!("{}: {e}", kind.name()));
                        continue;
                    }
                },
                None => None,
            };
            let launch = Launch {
                binary: &binary,
                dir: self.work.join(format!("{scenario}-{}", kind.name())),
                cpus: self.opts.cpus_proxy.clone(),
                nice: self.opts.nice,
                probe: contender::probe_for(spec.listen, probe, tls),
            };
            match contender::start(kind, &spec, launch).await {
                Ok(r) => running.push(r),
                Err(e) => self.skip(format!("{} in {scenario}: did not start: {e}", kind.name())),
            }
        }
        running
    }

    /// Runs the generator once against `addr`, as a child process (pinned as asked). With the
    /// `proxy`'s process, its CPU time over the measured window is taken too (from `/proc`, at
    /// the window's ends as timed from the generator's start: a few milliseconds early, both
    /// under full load).
    async fn run_load(
        &self,
        plan: &Plan,
        addr: SocketAddr,
        label: &str,
        proxy: Option<&Proc>,
    ) -> Result<RunReport, String> {
        let json = self.work.join(format!("load-{}.json", std::process::id()));
        let _ = std::fs::remove_file(&json);
        let mut args: Vec<String> = vec![
            "load".into(),
            "--addr".into(),
            addr.to_string(),
            "--protocol".into(),
            plan.protocol.name().into(),
            "--connections".into(),
            plan.connections.to_string(),
            "--streams".into(),
            plan.streams.to_string(),
            "--duration".into(),
            format!("{}ms", plan.duration.as_millis()),
            "--warmup".into(),
            format!("{}ms", plan.warmup.as_millis()),
            "--label".into(),
            label.into(),
            "--json".into(),
            json.display().to_string(),
            "--host".into(),
            plan.target.host.clone(),
            "--path".into(),
            plan.target.path.clone(),
        ];
        if let Some(r) = plan.rate {
            args.extend(["--rate".into(), format!("{r:.3}")]);
        }
        if plan.per_request {
            args.push("--new-connection-per-request".into());
        }
        if let Some(t) = &plan.targets_file {
            args.extend(["--targets-file".into(), t.display().to_string()]);
        }
        for h in &plan.headers {
            args.extend(["--header".into(), h.clone()]);
        }
        if plan.protocol.is_tls() {
            let ca = self
                .pki
                .as_ref()
                .ok_or("TLS load without certificates")?
                .ca
                .clone();
            args.extend(["--ca".into(), ca.display().to_string()]);
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut spawn = Spawn::new("load", &self.exe, &argv, &self.work);
        spawn.cpus = self.opts.cpus_load.clone();
        spawn.nice = self.opts.nice;
        spawn.inherit_stderr = true;
        let mut proc = spawn.start()?;
        let mut cpu = None;
        if let Some(proxy) = proxy {
            tokio::time::sleep(plan.warmup).await;
            let start = proxy.cpu_time();
            tokio::time::sleep(plan.duration).await;
            cpu = Some(proxy.cpu_time().saturating_sub(start));
        }
        let limit = plan.warmup + plan.duration + Duration::from_secs(60);
        match proc.wait(limit).await {
            Some(s) if s.success() => {}
            Some(s) => return Err(format!("generator failed ({s}): {}", proc.log_tail())),
            None => return Err(format!("generator still running after {limit:?}")),
        }
        let text = std::fs::read_to_string(&json)
            .map_err(|e| format!("reading {}: {e}", json.display()))?;
        let mut report: RunReport =
            serde_json::from_str(&text).map_err(|e| format!("parsing {}: {e}", json.display()))?;
        let responses = report.ok + report.non_2xx;
        if let Some(cpu) = cpu
            && responses > 0
        {
            report.proxy_cpu_us_per_response = Some(cpu.as_secs_f64() * 1e6 / responses as f64);
        }
        Ok(report)
    }

    /// Runs `plan` against every contender, in turn, for the configured rounds.
    async fn section(
        &self,
        title: &str,
        contenders: &[Running],
        plan: &Plan,
    ) -> Result<Section, String> {
        let mut runs = Vec::new();
        for round in 1..=self.opts.rounds {
            for c in contenders {
                eprintln!("[{title}] round {round}/{}: {}", self.opts.rounds, c.label);
                runs.push(
                    self.run_load(plan, c.addr, &c.label, c.proc.as_ref())
                        .await?,
                );
            }
        }
        Ok(Section::from_runs(title, &plan.describe(), runs))
    }

    /// Prints and writes a scenario's result.
    fn publish(
        &mut self,
        scenario: &str,
        sections: Vec<Section>,
    ) -> Result<ScenarioResult, String> {
        let result = ScenarioResult {
            scenario: scenario.into(),
            context: self.context(self.settings()),
            sections,
        };
        println!("{}", result.markdown());
        result.write(&self.opts.out)?;
        eprintln!(
            "weir-bench: wrote {}/{scenario}.{{md,json,svg}}",
            self.opts.out.display()
        );
        Ok(result)
    }
}

/// How many CPUs a `taskset -c` list names (`0`, `0-3`, `0,2,4-5`); `None` if it does not parse.
fn cpu_list_len(list: &str) -> Option<usize> {
    let mut n = 0;
    for part in list.split(',') {
        let part = part.trim();
        n += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?);
                b.checked_sub(a)? + 1
            }
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

fn ceiling(addr: SocketAddr) -> Running {
    Running::upstream_alone(addr, "upstream (no proxy)")
}

/// Starts the upstream and the contenders for a simple catch-all route to it, with `tweak`
/// applied to every spec.
async fn simple_setup(
    env: &mut Env,
    scenario: &str,
    tweak: impl Fn(&mut ProxySpec),
) -> Result<(Proc, Vec<Running>), String> {
    let (up, addrs) = env
        .start_upstream(&format!("{scenario}-upstream"), 1, false)
        .await?;
    let upstream = addrs[0];
    let workers = env.workers();
    let mut all = Vec::new();
    if env.selected(Kind::Upstream) {
        all.push(ceiling(upstream));
    }
    let access_log = env.opts.access_log;
    let make = |listen, admin| {
        let mut s = ProxySpec::simple(listen, admin, upstream, workers);
        s.access_log = access_log;
        tweak(&mut s);
        s
    };
    all.extend(
        env.start_contenders(
            scenario,
            make,
            &Target {
                host: "localhost".into(),
                path: "/".into(),
            },
        )
        .await,
    );
    Ok((up, all))
}

/// Small response: closed-loop throughput, then an open loop at half of nginx's (or, without
/// nginx, the fastest proxy's) median rate, for the p99 comparison.
pub async fn small(env: &mut Env) -> Result<ScenarioResult, String> {
    let (_up, contenders) = simple_setup(env, "small", |_| {}).await?;
    let plan = Plan::new(&env.opts, "/");
    let max = env
        .section(
            "small response, closed loop (max throughput)",
            &contenders,
            &plan,
        )
        .await?;
    let reference = max
        .row("nginx")
        .map(|r| ("nginx", r.rps))
        .or_else(|| {
            max.rows
                .iter()
                .filter(|r| r.contender != "upstream (no proxy)")
                .map(|r| (r.contender.as_str(), r.rps))
                .max_by(|a, b| a.1.total_cmp(&b.1))
        })
        .or_else(|| max.rows.first().map(|r| (r.contender.as_str(), r.rps)));
    let mut sections = vec![max.clone()];
    if let Some((who, rps)) = reference
        && rps > 0.0
    {
        let mut open = plan.clone();
        open.rate = Some((rps / 2.0).round().max(1.0));
        let title = format!("small response, open loop at half of {who}'s max rate");
        sections.push(env.section(&title, &contenders, &open).await?);
    }
    env.publish("small", sections)
}

/// 1 KiB and 64 KiB bodies.
pub async fn bodies(env: &mut Env) -> Result<ScenarioResult, String> {
    let (_up, contenders) = simple_setup(env, "bodies", |_| {}).await?;
    let mut sections = Vec::new();
    for (title, path) in [("1 KiB body", "/size/1024"), ("64 KiB body", "/size/65536")] {
        sections.push(
            env.section(title, &contenders, &Plan::new(&env.opts, path))
                .await?,
        );
    }
    env.publish("bodies", sections)
}

/// TLS termination: keep-alive throughput over TLS, then a full handshake per request.
pub async fn tls(env: &mut Env) -> Result<ScenarioResult, String> {
    let pki = env.pki()?;
    let (_plain, addrs) = env.start_upstream("tls-upstream", 1, false).await?;
    let upstream = addrs[0];
    let mut contenders = Vec::new();
    // The ceiling: the upstream itself serving TLS.
    let _tls_up = if env.selected(Kind::Upstream) {
        let (p, a) = env.start_upstream("tls-upstream-tls", 1, true).await?;
        contenders.push(Running::upstream_alone(a[0], "upstream (no proxy, TLS)"));
        Some(p)
    } else {
        None
    };
    let (workers, access_log) = (env.workers(), env.opts.access_log);
    let make = |listen, admin| {
        let mut s = ProxySpec::simple(listen, admin, upstream, workers);
        s.access_log = access_log;
        s.tls = Some(TlsSpec {
            cert: pki.cert.clone(),
            key: pki.key.clone(),
        });
        s
    };
    contenders.extend(
        env.start_contenders(
            "tls",
            make,
            &Target {
                host: "localhost".into(),
                path: "/".into(),
            },
        )
        .await,
    );
    let mut keep_alive = Plan::new(&env.opts, "/");
    keep_alive.protocol = Protocol::H1Tls;
    let mut handshakes = keep_alive.clone();
    handshakes.per_request = true;
    let sections = vec![
        env.section(
            "TLS keep-alive (HTTP/1.1 over TLS)",
            &contenders,
            &keep_alive,
        )
        .await?,
        env.section(
            "TLS handshakes (new connection per request, no resumption)",
            &contenders,
            &handshakes,
        )
        .await?,
    ];
    env.publish("tls", sections)
}

/// 1,000 routes matched by host and path; the requests visit all of them.
pub async fn routes(env: &mut Env) -> Result<ScenarioResult, String> {
    let (_up, addrs) = env.start_upstream("routes-upstream", 1, false).await?;
    let upstream = addrs[0];
    let (routes, targets) = many_routes(1_000, upstream);
    let file = env.work.join("routes-targets.txt");
    let text: String = targets.iter().map(|(h, p)| format!("{h} {p}\n")).collect();
    std::fs::write(&file, text).map_err(|e| e.to_string())?;
    let mut contenders = Vec::new();
    if env.selected(Kind::Upstream) {
        contenders.push(ceiling(upstream));
    }
    let (workers, access_log) = (env.workers(), env.opts.access_log);
    let make = |listen, admin| {
        let mut s = ProxySpec::simple(listen, admin, upstream, workers);
        s.access_log = access_log;
        s.routes = routes.clone();
        s
    };
    let probe = Target {
        host: targets[0].0.clone(),
        path: targets[0].1.clone(),
    };
    contenders.extend(env.start_contenders("routes", make, &probe).await);
    let mut plan = Plan::new(&env.opts, "/");
    plan.targets_file = Some(file);
    let sections = vec![
        env.section("1,000 routes by host and path", &contenders, &plan)
            .await?,
    ];
    env.publish("routes", sections)
}

async fn upstream_counts(addrs: &[SocketAddr]) -> Vec<u64> {
    let mut out = Vec::new();
    for a in addrs {
        let n = contender::request(*a, "GET", "/__stats")
            .await
            .ok()
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .and_then(|v| v["requests"].as_u64())
            .unwrap_or(0);
        out.push(n);
    }
    out
}

/// Weighted canary: 90 % to one upstream listener, 10 % to the other; the split each contender
/// produced is read from the upstream's counters.
pub async fn canary(env: &mut Env) -> Result<ScenarioResult, String> {
    let (_up, addrs) = env.start_upstream("canary-upstream", 2, false).await?;
    let (v1, v2) = (addrs[0], addrs[1]);
    let (workers, access_log) = (env.workers(), env.opts.access_log);
    let make = |listen, admin| {
        let mut s = ProxySpec::simple(listen, admin, v1, workers);
        s.access_log = access_log;
        s.routes[0].backends = vec![
            Backend {
                addr: v1,
                weight: 90,
            },
            Backend {
                addr: v2,
                weight: 10,
            },
        ];
        s
    };
    let contenders = env
        .start_contenders(
            "canary",
            make,
            &Target {
                host: "localhost".into(),
                path: "/".into(),
            },
        )
        .await;
    let plan = Plan::new(&env.opts, "/");
    let title = "weighted canary 90/10";
    let mut runs = Vec::new();
    let mut split: HashMap<String, (u64, u64)> = HashMap::new();
    for round in 1..=env.opts.rounds {
        for c in &contenders {
            eprintln!("[{title}] round {round}/{}: {}", env.opts.rounds, c.label);
            let before = upstream_counts(&addrs).await;
            runs.push(
                env.run_load(&plan, c.addr, &c.label, c.proc.as_ref())
                    .await?,
            );
            let after = upstream_counts(&addrs).await;
            let e = split.entry(c.label.clone()).or_default();
            e.0 += after[0] - before[0];
            e.1 += after[1] - before[1];
        }
    }
    let mut section = Section::from_runs(title, &plan.describe(), runs);
    for (name, (a, b)) in split {
        if let Some(row) = section.row_mut(&name) {
            let total = (a + b).max(1) as f64;
            row.note = format!(
                "split {:.1}% / {:.1}%",
                a as f64 * 100.0 / total,
                b as f64 * 100.0 / total
            );
        }
    }
    env.publish("canary", vec![section])
}

/// A built-in filter of Weir (`builtin:NAME`, embedded from `filters/*`), as a plugin.
fn builtin(name: &str) -> WasmFilter {
    WasmFilter {
        name: name.replace('-', "_"),
        module: format!("builtin:{name}"),
        config: None,
    }
}

/// The token every request of the wasm scenario carries: HS256, signed with
/// [`BENCH_JWT_KEY`], issuer `https://bench.weir.invalid`, audience `bench`, expiring in 2100.
pub const BENCH_JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImJlbmNoIn0.\
eyJpc3MiOiJodHRwczovL2JlbmNoLndlaXIuaW52YWxpZCIsInN1YiI6ImxvYWQiLCJhdWQiOiJiZW5jaCIsImV4cCI6\
NDEwMjQ0NDgwMH0.oOhOQjCC2i-t0Yw7HlcSuGmkkak8xx4VAlB6dqYpMA8";

/// The HS256 key (base64url, a JWK `oct` key) that signed [`BENCH_JWT`].
pub const BENCH_JWT_KEY: &str = "d2Vpci1iZW5jaC1oczI1Ni1zZWNyZXQtMDEyMzQ1Njc4OQ";

/// The three filters of the wasm scenario's last variant, configured as a platform team would:
/// a JWT required on every path, a rate limit far above the offered load (so every request is
/// counted but none refused), and Istio's standard metrics.
fn policy_filters() -> Vec<WasmFilter> {
    let jwks = serde_json::json!({
        "keys": [{ "kty": "oct", "kid": "bench", "alg": "HS256", "k": BENCH_JWT_KEY }]
    });
    let jwt = serde_json::json!({
        "providers": [{
            "name": "bench",
            "issuer": "https://bench.weir.invalid",
            "audiences": ["bench"],
            "jwks": jwks.to_string(),
        }],
        "rules": [{ "match": { "prefix": "/" }, "requires": { "provider_name": "bench" } }],
    });
    let ratelimit = serde_json::json!({ "requests": 100_000_000u64, "per": "1s" });
    let mut filters = vec![builtin("jwt-authn"), builtin("ratelimit"), builtin("stats")];
    filters[0].config = Some(jwt.to_string());
    filters[1].config = Some(ratelimit.to_string());
    filters
}

/// `n` built-in no-op filters, plugins `noop1`..`noopN` (one VM, as plugins of one module and
/// vm_id share it).
fn noops(n: usize) -> Vec<WasmFilter> {
    (1..=n)
        .map(|i| WasmFilter {
            name: format!("noop{i}"),
            ..builtin("noop")
        })
        .collect()
}

/// Weir with 0 filters, 1 and 3 no-op filters, and 3 policy filters (jwt-authn, ratelimit,
/// stats), all built-in; every request carries [`BENCH_JWT`]. A variant Weir refuses is
/// skipped with Weir's message.
pub async fn wasm(env: &mut Env) -> Result<ScenarioResult, String> {
    let weir = match env.binary(Kind::Weir) {
        Ok(b) => b,
        Err(e) => {
            env.skip(format!("wasm scenario: {e}"));
            return env.publish("wasm", Vec::new());
        }
    };
    let (_up, addrs) = env.start_upstream("wasm-upstream", 1, false).await?;
    let upstream = addrs[0];
    let mut contenders = Vec::new();
    for (label, filters) in [
        ("weir, 0 filters", vec![]),
        ("weir, 1 filter (no-op)", vec![builtin("noop")]),
        ("weir, 3 filters (no-op)", noops(3)),
        (
            "weir, 3 filters (jwt-authn, ratelimit, stats)",
            policy_filters(),
        ),
    ] {
        let ports = free_ports(2)?;
        let mut spec = ProxySpec::simple(
            loopback(ports[0]),
            loopback(ports[1]),
            upstream,
            env.workers(),
        );
        spec.access_log = env.opts.access_log;
        spec.wasm_filters = filters;
        let mut probe = contender::probe_for(
            spec.listen,
            &Target {
                host: "localhost".into(),
                path: "/".into(),
            },
            None,
        );
        probe.headers = vec![bearer()];
        let launch = Launch {
            binary: &weir,
            dir: env.work.join(format!("wasm-{}", contenders.len())),
            cpus: env.opts.cpus_proxy.clone(),
            nice: env.opts.nice,
            probe,
        };
        match contender::start(Kind::Weir, &spec, launch).await {
            Ok(mut r) => {
                r.label = label.into();
                contenders.push(r);
            }
            Err(e) => env.skip(format!("{label}: {}", e.lines().last().unwrap_or(&e))),
        }
    }
    let mut plan = Plan::new(&env.opts, "/");
    plan.headers = vec![format!("authorization: Bearer {BENCH_JWT}")];
    let sections = vec![
        env.section("Weir with wasm filters", &contenders, &plan)
            .await?,
    ];
    env.publish("wasm", sections)
}

/// The `authorization` header carrying [`BENCH_JWT`].
fn bearer() -> (http::header::HeaderName, http::HeaderValue) {
    (
        http::header::AUTHORIZATION,
        http::HeaderValue::from_str(&format!("Bearer {BENCH_JWT}")).expect("a valid header value"),
    )
}

/// A reload every 100 ms under a closed-loop load; failed requests are counted.
pub async fn reload(env: &mut Env) -> Result<ScenarioResult, String> {
    let (_up, mut contenders) = simple_setup(env, "reload", |_| {}).await?;
    contenders.retain(|c| c.kind != Kind::Upstream);
    let plan = Plan::new(&env.opts, "/");
    let title = "reload every 100 ms under load";
    let mut runs = Vec::new();
    let mut counts: HashMap<String, (u64, u64, String)> = HashMap::new();
    for round in 1..=env.opts.rounds {
        for c in contenders.iter_mut() {
            eprintln!("[{title}] round {round}/{}: {}", env.opts.rounds, c.label);
            let until = Instant::now() + plan.warmup + plan.duration;
            let label = c.label.clone();
            let addr = c.addr;
            let reloads = async {
                let (mut ok, mut failed, mut last) = (0u64, 0u64, String::new());
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                tick.tick().await;
                while Instant::now() < until {
                    tick.tick().await;
                    match c.reload().await {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            failed += 1;
                            last = e;
                        }
                    }
                }
                (ok, failed, last)
            };
            let (report, (ok, failed, last)) =
                tokio::join!(env.run_load(&plan, addr, &label, None), reloads);
            runs.push(report?);
            let e = counts.entry(label).or_default();
            e.0 += ok;
            e.1 += failed;
            if !last.is_empty() {
                e.2 = last;
            }
        }
    }
    let mut section = Section::from_runs(title, &plan.describe(), runs);
    for (name, (ok, failed, last)) in counts {
        if let Some(row) = section.row_mut(&name) {
            row.note = format!(
                "{ok} reloads, {failed} refused{}",
                if last.is_empty() {
                    String::new()
                } else {
                    format!(" ({last})")
                }
            );
        }
    }
    env.publish("reload", vec![section])
}

/// Resident memory of every contender while `count` idle client connections are open.
pub async fn idle(env: &mut Env, count: usize) -> Result<ScenarioResult, String> {
    let (up, contenders) = simple_setup(env, "idle", |s| {
        s.max_connections = s.max_connections.max(count * 2)
    })
    .await?;
    let mut rows = Vec::new();
    for c in &contenders {
        let rss = |c: &Running| {
            if c.kind == Kind::Upstream {
                up.rss_kib()
            } else {
                c.rss_kib()
            }
        };
        let before = rss(c);
        eprintln!("[idle] {}: opening {count} connections", c.label);
        let ready = env.work.join("idle-ready.json");
        let _ = std::fs::remove_file(&ready);
        let args = [
            "load".to_string(),
            "--addr".into(),
            c.addr.to_string(),
            "--host".into(),
            "localhost".into(),
            "--idle".into(),
            count.to_string(),
            "--hold".into(),
            "600s".into(),
            "--ready-file".into(),
            ready.display().to_string(),
            "--no-progress".into(),
        ];
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut spawn = Spawn::new("idle-load", &env.exe, &argv, &env.work);
        spawn.cpus = env.opts.cpus_load.clone();
        spawn.nice = env.opts.nice;
        let mut load = spawn.start()?;
        let deadline = Instant::now() + Duration::from_secs(180);
        while !ready.exists() {
            if load.exited().is_some() || Instant::now() > deadline {
                return Err(format!(
                    "idle generator did not get ready: {}",
                    load.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let during = rss(c);
        let report: IdleReport = std::fs::read_to_string(&ready)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        drop(load);
        let per_conn = during.saturating_sub(before) as f64 / report.open.max(1) as f64;
        rows.push(Row {
            contender: c.label.clone(),
            rss_kib: Some(during),
            note: format!(
                "{} of {count} open; {:.1} MiB before; {:.1} KiB per connection",
                report.open,
                before as f64 / 1024.0,
                per_conn
            ),
            ..Default::default()
        });
    }
    let section = Section {
        title: format!("{count} idle connections (HTTP/1.1 keep-alive, one request each, then idle)"),
        load: "RSS of all the contender's processes (master and workers), 2 s after the last connection opened".into(),
        rows,
        runs: Vec::new(),
        memory: true,
    };
    env.publish("idle", vec![section])
}

/// Every scenario in turn.
pub async fn all(env: &mut Env) -> Result<ScenarioResult, String> {
    small(env).await?;
    bodies(env).await?;
    tls(env).await?;
    routes(env).await?;
    canary(env).await?;
    wasm(env).await?;
    reload(env).await?;
    idle(env, 10_000).await
}

/// Load for profile-guided optimisation (`loadtest/pgo.sh`): Weir alone, no installs, one
/// round of every scenario's loads (the idle one with 1,000 connections) and of HTTP/2, in
/// clear and over TLS. Fails when Weir answered nothing or had errors anywhere, so that a
/// profile is never trained on a broken run.
pub async fn train(env: &mut Env) -> Result<ScenarioResult, String> {
    env.opts.no_install = true;
    env.opts.rounds = 1;
    env.opts.contenders = vec![Kind::Weir];
    env.binary(Kind::Weir)?;
    let mut sections = Vec::new();
    for result in [
        small(env).await?,
        bodies(env).await?,
        tls(env).await?,
        routes(env).await?,
        canary(env).await?,
        wasm(env).await?,
        reload(env).await?,
        h2(env).await?,
        idle(env, 1_000).await?,
    ] {
        sections.extend(result.sections);
    }
    if !env.skipped.is_empty() {
        return Err(format!("training skipped: {}", env.skipped.join("; ")));
    }
    let result = env.publish("train", sections)?;
    check_answered(&result, |s| !s.title.contains("idle connections"))?;
    Ok(result)
}

/// HTTP/2 with prior knowledge (h2c) and over TLS (ALPN `h2`), 8 streams per connection.
async fn h2(env: &mut Env) -> Result<ScenarioResult, String> {
    let pki = env.pki()?;
    let (_up, clear) = simple_setup(env, "h2c", |_| {}).await?;
    let (_up_tls, tls) = simple_setup(env, "h2-tls", |s| {
        s.tls = Some(TlsSpec {
            cert: pki.cert.clone(),
            key: pki.key.clone(),
        });
    })
    .await?;
    let mut plan = Plan::new(&env.opts, "/");
    plan.connections = plan.connections.div_ceil(8);
    plan.streams = 8;
    plan.protocol = Protocol::H2c;
    let mut over_tls = plan.clone();
    over_tls.protocol = Protocol::H2Tls;
    let sections = vec![
        env.section("HTTP/2 with prior knowledge (h2c)", &clear, &plan)
            .await?,
        env.section("HTTP/2 over TLS", &tls, &over_tls).await?,
    ];
    env.publish("h2", sections)
}

/// An error naming the first section of `result` (of those `check` selects) that has no rows,
/// or row that answered nothing or had errors or non-2xx answers.
fn check_answered(result: &ScenarioResult, check: impl Fn(&Section) -> bool) -> Result<(), String> {
    for s in result.sections.iter().filter(|s| check(s)) {
        if s.rows.is_empty() {
            return Err(format!("nothing ran in `{}`", s.title));
        }
        for r in &s.rows {
            if r.rps <= 0.0 || r.errors > 0 || r.non_2xx > 0 {
                return Err(format!(
                    "{} failed in `{}`: {} req/s, {} errors, {} non-2xx",
                    r.contender, s.title, r.rps, r.errors, r.non_2xx
                ));
            }
        }
    }
    Ok(())
}

/// Seconds long, no installs: the upstream alone and Weir when it is built, closed and open
/// loop. Fails when a contender answered nothing or had errors.
pub async fn smoke(env: &mut Env) -> Result<ScenarioResult, String> {
    env.opts.no_install = true;
    env.opts.rounds = 1;
    env.opts.contenders = vec![Kind::Upstream, Kind::Weir];
    let (_up, contenders) = simple_setup(env, "smoke", |_| {}).await?;
    let mut plan = Plan::new(&env.opts, "/");
    plan.connections = plan.connections.min(8);
    plan.duration = plan.duration.min(Duration::from_secs(2));
    plan.warmup = plan.warmup.min(Duration::from_millis(500));
    let mut open = plan.clone();
    open.rate = Some(1_000.0);
    open.duration = Duration::from_secs(1);
    let sections = vec![
        env.section("smoke, closed loop", &contenders, &plan)
            .await?,
        env.section("smoke, open loop", &contenders, &open).await?,
    ];
    let result = env.publish("smoke", sections)?;
    check_answered(&result, |_| true).map_err(|e| format!("smoke failed: {e}"))?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::cpu_list_len;

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(cpu_list_len("1"), Some(1));
        assert_eq!(cpu_list_len("0-3"), Some(4));
        assert_eq!(cpu_list_len("0,2,4-5"), Some(4));
        assert_eq!(cpu_list_len("3-1"), None);
        assert_eq!(cpu_list_len("x"), None);
        assert_eq!(cpu_list_len(""), None);
    }
}
