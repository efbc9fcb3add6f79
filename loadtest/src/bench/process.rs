//! Child processes of the runner: started in their own process group, with a raised descriptor
//! limit and optional CPU pinning, and always stopped (the whole group) when their guard drops,
//! including on an error or Ctrl-C.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Descriptor limit wanted for every child: 10,000 idle connections through a proxy need two
/// descriptors each at worst, plus upstream connections.
pub const NOFILE_WANTED: u64 = 65_536;

/// The descriptor limit children get: [`NOFILE_WANTED`], or the hard limit of this process
/// if that is lower (raising a hard limit needs privileges a container may not have).
pub fn nofile() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|h| {
            if h == "unlimited" {
                Some(u64::MAX)
            } else {
                h.parse().ok()
            }
        })
        .unwrap_or(NOFILE_WANTED);
    hard.min(NOFILE_WANTED)
}

/// How to start a child.
#[derive(Debug, Clone)]
pub struct Spawn {
    /// Name used in messages and in the log file name.
    pub name: String,
    /// Program to run.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// CPU list for `taskset -c` (e.g. `0`, `1`, `0-1`); `None` runs unpinned.
    pub cpus: Option<String>,
    /// Working directory, and where `NAME.log` (stdout and stderr) goes.
    pub dir: PathBuf,
    /// Let stderr through to the terminal (the generator's progress bar) instead of the log.
    pub inherit_stderr: bool,
    /// Scheduling priority (`nice -n`); 0 leaves it as it is. Negative values (root only) put
    /// the benchmark ahead of other work on a shared machine.
    pub nice: i32,
}

impl Spawn {
    /// A spawn of `program` with `args`, logging into `dir`.
    pub fn new(name: &str, program: impl Into<PathBuf>, args: &[&str], dir: &Path) -> Self {
        Self {
            name: name.into(),
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            cpus: None,
            dir: dir.to_path_buf(),
            inherit_stderr: false,
            nice: 0,
        }
    }

    /// The full command line: `prlimit` (when available) and `taskset` (when pinned) exec the
    /// program, so the child's pid is the program's.
    pub fn command_line(&self) -> Vec<String> {
        let mut argv = Vec::new();
        if Path::new("/usr/bin/prlimit").exists() {
            let n = nofile();
            argv.extend([
                "/usr/bin/prlimit".to_string(),
                format!("--nofile={n}:{n}"),
                "--".to_string(),
            ]);
        }
        if self.nice != 0 {
            argv.extend(["nice".to_string(), "-n".to_string(), self.nice.to_string()]);
        }
        if let Some(cpus) = &self.cpus {
            argv.extend(["taskset".to_string(), "-c".to_string(), cpus.clone()]);
        }
        argv.push(self.program.display().to_string());
        argv.extend(self.args.iter().cloned());
        argv
    }

    /// Starts the process.
    pub fn start(&self) -> Result<Proc, String> {
        let log = self.dir.join(format!("{}.log", self.name));
        let out = File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let err = if self.inherit_stderr {
            Stdio::inherit()
        } else {
            Stdio::from(out.try_clone().map_err(|e| e.to_string())?)
        };
        let argv = self.command_line();
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting {} ({}): {e}", self.name, argv.join(" ")))?;
        Ok(Proc {
            name: self.name.clone(),
            child,
            log,
            stopped: false,
        })
    }
}

/// A running child process group, stopped when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Proc {
    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name it was started with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// `Some(status)` once it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` (e.g. `HUP`, `TERM`, `USR2`) to the leader only.
    pub fn signal(&self, signal: &str) -> bool {
        send_signal(signal, &self.pid().to_string())
    }

    /// Resident memory of every process in its group, in KiB (the master and workers together).
    pub fn rss_kib(&self) -> u64 {
        group_rss_kib(self.pid())
    }

    /// CPU time its group has used so far (the master and workers, all threads).
    pub fn cpu_time(&self) -> Duration {
        group_cpu_time(self.pid())
    }

    /// Waits for it to exit by itself, polling, for at most `limit`.
    pub async fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the whole group: TERM, then KILL after two seconds.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let group = format!("-{}", self.pid());
        send_signal("TERM", &group);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if self.exited().is_some() && group_pids(self.pid()).is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        send_signal("KILL", &group);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn send_signal(signal: &str, target: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{signal}"), "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The live (not zombie) pids whose process group is `pgid`, read from `/proc`.
pub fn group_pids(pgid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            parse_stat_pgrp(&stat) == Some(pgid) && parse_stat_state(&stat) != Some('Z')
        })
        .collect()
}

/// The fields of a `/proc/PID/stat` line after the command name (which may hold spaces and
/// parentheses, hence the last `)`): state, ppid, pgrp, ...
fn stat_fields(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace())
}

/// The process group (5th field) of a `/proc/PID/stat` line.
pub fn parse_stat_pgrp(stat: &str) -> Option<u32> {
    stat_fields(stat)?.nth(2)?.parse().ok()
}

/// The state letter (3rd field) of a `/proc/PID/stat` line.
pub fn parse_stat_state(stat: &str) -> Option<char> {
    stat_fields(stat)?.next()?.chars().next()
}

/// User plus system CPU time (the 14th and 15th fields), in clock ticks, of a `/proc/PID/stat`
/// line: every thread of the process.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let mut fields = stat_fields(stat)?.skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// Clock ticks per second of `/proc` times (`getconf CLK_TCK`; 100 if that fails).
fn clock_ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}

/// CPU time used so far by the processes of group `pgid` (all their threads), from `/proc`.
pub fn group_cpu_time(pgid: u32) -> Duration {
    let ticks: u64 = group_pids(pgid)
        .into_iter()
        .filter_map(|pid| {
            parse_stat_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
        })
        .sum();
    Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second() as f64)
}

/// `VmRSS` of a `/proc/PID/status` text, in KiB.
pub fn parse_status_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident memory of every process in group `pgid`, in KiB.
pub fn group_rss_kib(pgid: u32) -> u64 {
    group_pids(pgid)
        .into_iter()
        .filter_map(|pid| {
            parse_status_rss_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
        })
        .sum()
}

/// `count` distinct free ports on 127.0.0.1 (bound, then released; taken right away by the caller).
pub fn free_ports(count: usize) -> Result<Vec<u16>, String> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("finding a free port: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()).map_err(|e| e.to_string()))
        .collect()
}

/// A loopback address with `port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_and_status_parsing() {
        let stat = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0";
        assert_eq!(parse_stat_pgrp(stat), Some(1234));
        assert_eq!(parse_stat_state(stat), Some('S'));
        assert_eq!(parse_stat_pgrp("garbage"), None);
        // utime 250 and stime 40 are the 14th and 15th fields.
        let stat = "77 (weir) S 1 77 77 0 -1 4194560 900 0 0 0 250 40 0 0 20 0 3 0 5";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(290));
        assert_eq!(parse_stat_cpu_ticks("77 (weir) S 1 77"), None);
        let status = "Name:\tnginx\nVmPeak:\t  100 kB\nVmRSS:\t    5120 kB\nThreads: 1\n";
        assert_eq!(parse_status_rss_kib(status), Some(5120));
        assert_eq!(parse_status_rss_kib("Name: x\n"), None);
    }

    #[test]
    fn nofile_is_positive_and_capped() {
        let n = nofile();
        assert!(n > 0 && n <= NOFILE_WANTED);
    }

    #[test]
    fn command_line_wraps_with_limits_and_pinning() {
        let mut s = Spawn::new("x", "/bin/true", &["a", "b"], Path::new("/tmp"));
        s.cpus = Some("1".into());
        let argv = s.command_line();
        assert_eq!(
            &argv[argv.len() - 6..],
            ["taskset", "-c", "1", "/bin/true", "a", "b"]
        );
    }

    #[tokio::test]
    async fn a_dropped_guard_stops_the_whole_group() {
        let dir = std::env::temp_dir();
        // A shell with a child of its own: both are in the group and both must go.
        let p = Spawn::new(
            "group-test",
            "/bin/sh",
            &["-c", "sleep 30 & sleep 30"],
            &dir,
        )
        .start()
        .unwrap();
        let pgid = p.pid();
        let deadline = Instant::now() + Duration::from_secs(5);
        while group_pids(pgid).len() < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(group_pids(pgid).len() >= 2);
        assert!(p.rss_kib() > 0);
        assert!(
            p.cpu_time() < Duration::from_secs(1),
            "sleeping costs no CPU"
        );
        drop(p);
        assert!(group_pids(pgid).is_empty());
    }

    #[tokio::test]
    async fn a_busy_group_shows_its_cpu_time() {
        let p = Spawn::new(
            "cpu-test",
            "/bin/sh",
            &["-c", "while :; do :; done"],
            &std::env::temp_dir(),
        )
        .start()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while p.cpu_time() < Duration::from_millis(300) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            p.cpu_time() >= Duration::from_millis(300),
            "{:?}",
            p.cpu_time()
        );
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(5).unwrap();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 5);
    }
}
