//! Command-line arguments shared by the binaries (`weir-load`, `weir-bench-upstream` and the
//! `load` / `upstream` subcommands of `weir-bench`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::generator::{LoadConfig, Mode, Protocol, Target};
use crate::report::{self, RunReport};
use crate::svg;

/// Parses `NAME: VALUE` into a request header.
pub fn parse_header(s: &str) -> Result<(http::header::HeaderName, http::HeaderValue), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: expected NAME: VALUE"))?;
    let name = http::header::HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|e| format!("`{s}`: header name: {e}"))?;
    let value = http::HeaderValue::from_str(value.trim())
        .map_err(|e| format!("`{s}`: header value: {e}"))?;
    Ok((name, value))
}

/// Parses `250ms`, `10s`, `2m` or a bare number of seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected e.g. 500ms, 10s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1_000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("bad duration {s:?}: {e}"))
}

/// Arguments of the load generator.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Address to connect to.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Path to request.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// Host header / :authority (default: the address).
    #[arg(long)]
    pub host: Option<String>,
    /// File of requests to send in turn, one `HOST PATH` per line (overrides --host/--path).
    #[arg(long)]
    pub targets_file: Option<PathBuf>,
    /// An extra request header, `NAME: VALUE`, sent with every request; repeatable.
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<(http::header::HeaderName, http::HeaderValue)>,
    /// Protocol.
    #[arg(long, value_enum, default_value = "h1")]
    pub protocol: Protocol,
    /// Open a new connection for every request (with TLS: one full handshake per request).
    #[arg(long)]
    pub new_connection_per_request: bool,
    /// Connections (with --new-connection-per-request: concurrent requests).
    #[arg(short, long, default_value_t = 64)]
    pub connections: usize,
    /// Concurrent streams per HTTP/2 connection.
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Constant rate in requests per second (open loop); without it, a closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measured time.
    #[arg(short, long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Warm-up before the measured time, left out of every figure.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Longest wait for one response.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// CA certificate (PEM) to trust for TLS protocols.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// TLS server name (SNI).
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Generator threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Label for the report.
    #[arg(long)]
    pub label: Option<String>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a latency-by-percentile chart (SVG) to this file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Idle mode: open this many connections, one request each, then hold them idle.
    #[arg(long)]
    pub idle: Option<usize>,
    /// Idle mode: how long to hold the connections.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub hold: Duration,
    /// Idle mode: write this file (JSON) once all connections are open.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

impl LoadArgs {
    /// The generator configuration these arguments describe.
    pub fn to_config(&self) -> Result<LoadConfig, String> {
        let targets = match &self.targets_file {
            Some(path) => read_targets(path)?,
            None => vec![Target {
                host: self.host.clone().unwrap_or_else(|| self.addr.to_string()),
                path: self.path.clone(),
            }],
        };
        let tls = match (&self.ca, self.protocol.is_tls()) {
            (Some(ca), true) => {
                Some(crate::tls::client_config_from_file(ca, &[]).map_err(|e| e.to_string())?)
            }
            (None, true) => return Err("TLS protocols need --ca".into()),
            _ => None,
        };
        Ok(LoadConfig {
            label: self.label.clone().unwrap_or_else(|| self.addr.to_string()),
            addr: self.addr,
            protocol: self.protocol,
            new_connection_per_request: self.new_connection_per_request,
            connections: self.connections,
            streams: self.streams,
            mode: self.rate.map_or(Mode::Closed, |rate| Mode::Open { rate }),
            warmup: self.warmup,
            duration: self.duration,
            timeout: self.timeout,
            targets,
            headers: self.headers.clone(),
            tls,
            server_name: self.server_name.clone(),
            progress: !self.no_progress,
        })
    }

    /// Builds a runtime and runs the generator (or the idle mode) as these arguments say;
    /// prints the result and writes the requested files.
    pub fn execute(&self) -> Result<(), String> {
        let cfg = self.to_config()?;
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = self.threads {
            rt.worker_threads(n.max(1));
        }
        let rt = rt
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        if let Some(count) = self.idle {
            let ready_file = self.ready_file.clone();
            let report = rt
                .block_on(crate::generator::hold_idle(&cfg, count, self.hold, |r| {
                    eprintln!(
                        "idle: {} of {} connections open, {} failed",
                        r.open, r.requested, r.failed
                    );
                    if let Some(path) = &ready_file {
                        let _ = std::fs::write(path, serde_json::to_string(r).unwrap_or_default());
                    }
                }))
                .map_err(|e| e.to_string())?;
            let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
            println!("{json}");
            if let Some(path) = &self.json {
                std::fs::write(path, json)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
            }
            return Ok(());
        }
        let report = rt
            .block_on(crate::generator::run(cfg))
            .map_err(|e| e.to_string())?;
        print_report(&report);
        if let Some(path) = &self.json {
            let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
            std::fs::write(path, json).map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        if let Some(path) = &self.svg {
            let chart = svg::latency_chart(
                &report.label,
                &[svg::Series {
                    name: &report.label,
                    points: &report.latency_curve,
                }],
            );
            std::fs::write(path, chart).map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        Ok(())
    }
}

/// Prints a report as a one-row Markdown table plus the counts.
pub fn print_report(r: &RunReport) {
    let mode = match r.rate {
        Some(rate) => format!("open loop at {} req/s", report::fmt_rate(rate)),
        None => "closed loop".to_string(),
    };
    println!(
        "{} {}, {} connections x {} streams{}, {:.1}s measured after {:.1}s warm-up: {} ok, {} non-2xx, {} errors\n",
        r.protocol,
        mode,
        r.connections,
        r.streams_per_connection,
        if r.new_connection_per_request {
            ", new connection per request"
        } else {
            ""
        },
        r.duration_s,
        r.warmup_s,
        r.ok,
        r.non_2xx,
        r.errors
    );
    print!("{}{}", report::MARKDOWN_HEADER, report::markdown_row(r));
}

/// Reads a targets file: one `HOST PATH` per line; blank lines and `#` comments are skipped.
pub fn read_targets(path: &std::path::Path) -> Result<Vec<Target>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    parse_targets(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses the text of a targets file.
pub fn parse_targets(text: &str) -> Result<Vec<Target>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(host), Some(path), None) => out.push(Target {
                host: host.into(),
                path: path.into(),
            }),
            _ => return Err(format!("line {}: expected `HOST PATH`", n + 1)),
        }
    }
    if out.is_empty() {
        return Err("no targets".into());
    }
    Ok(out)
}

/// Arguments of the benchmark upstream.
#[derive(Debug, Clone, Args)]
pub struct UpstreamArgs {
    /// Address to listen on; repeat for several listeners (each counts its own requests).
    #[arg(long, default_value = "127.0.0.1:5678")]
    pub listen: Vec<SocketAddr>,
    /// Body size, in bytes, for paths other than /size/N.
    #[arg(long, default_value_t = 13)]
    pub body_size: usize,
    /// Largest body /size/N may ask for.
    #[arg(long, default_value_t = crate::upstream::DEFAULT_MAX_BODY)]
    pub max_body_size: usize,
    /// Server threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl UpstreamArgs {
    /// Runs the upstream until the process is stopped.
    pub fn execute(&self) -> Result<(), String> {
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = self.threads {
            rt.worker_threads(n.max(1));
        }
        let rt = rt
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let config = crate::upstream::UpstreamConfig {
            body_size: self.body_size,
            max_body_size: self.max_body_size,
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let read = |p: &PathBuf| {
                    std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()))
                };
                Some(crate::upstream::tls_acceptor(&read(cert)?, &read(key)?)?)
            }
            _ => None,
        };
        rt.block_on(async {
            for addr in &self.listen {
                let (local, _) = crate::upstream::spawn(*addr, config.clone(), tls.clone())
                    .await
                    .map_err(|e| format!("listening on {addr}: {e}"))?;
                eprintln!("weir-bench-upstream listening on {local}");
            }
            let _ = tokio::signal::ctrl_c().await;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn targets_files() {
        let t = parse_targets("# comment\n\na.example.com /a/\n  b.example.com /b/x  \n").unwrap();
        assert_eq!(
            t,
            vec![
                Target {
                    host: "a.example.com".into(),
                    path: "/a/".into()
                },
                Target {
                    host: "b.example.com".into(),
                    path: "/b/x".into()
                }
            ]
        );
        assert!(parse_targets("onlyhost\n").is_err());
        assert!(parse_targets("a /b c\n").is_err());
        assert!(parse_targets("# nothing\n").is_err());
    }
}
