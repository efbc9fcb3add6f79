//! Configuration: the file format (`schema`), durations, and compiling into a snapshot.

pub mod compile;
pub mod duration;
pub mod plugins;
pub mod reference;
pub mod schema;

use std::fmt;
use std::path::Path;

/// One problem in a config file, located at a line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// 1-based column (0 when unknown).
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    fn one(file: &str, line: usize, column: usize, message: impl Into<String>) -> ConfigErrors {
        ConfigErrors(vec![ConfigError {
            file: file.to_string(),
            line,
            column,
            message: message.into(),
        }])
    }
}

/// Parse YAML text into the schema and into JSON (for `/config_dump` and fingerprints).
pub fn parse(text: &str, file: &str) -> Result<(schema::Config, serde_json::Value), ConfigErrors> {
    let cfg: schema::Config = serde_saphyr::from_str_with_options(text, yaml_options())
        .map_err(|e| yaml_error(&e, file))?;
    let json: serde_json::Value = serde_saphyr::from_str_with_options(text, yaml_options())
        .map_err(|e| yaml_error(&e, file))?;
    Ok((cfg, json))
}

/// YAML 1.2 core booleans only (`true`/`false`): a plugin called `n` or a value `no` stays a
/// string, as Kubernetes users expect; messages without source snippets (one line each).
fn yaml_options() -> serde_saphyr::Options {
    let mut o = serde_saphyr::Options::default();
    o.strict_booleans = true;
    o.with_snippet = false;
    o
}

fn yaml_error(e: &serde_saphyr::Error, file: &str) -> ConfigErrors {
    let (line, column) = e
        .location()
        .map_or((0, 0), |l| (l.line() as usize, l.column() as usize));
    // The rendered message may carry a source snippet and the position again: keep the
    // first line, without the position suffix.
    let rendered = e.to_string();
    let first = rendered.lines().next().unwrap_or("invalid YAML").trim();
    let message = match first.find(" at line ") {
        Some(i) => &first[..i],
        None => first,
    };
    let message = message.strip_prefix("error: ").unwrap_or(message);
    ConfigErrors::one(file, line, column, message.to_string())
}

/// Read and check a config file, without side effects (what `weir validate` runs).
pub fn check_file(path: &Path) -> Result<compile::Checked, ConfigErrors> {
    check_source(path, &read_file(path)?)
}

/// Read a config file.
pub fn read_file(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors::one(
            &path.display().to_string(),
            0,
            0,
            format!("cannot read config: {e}"),
        )
    })
}

/// Check the text of the config file at `path` (relative paths resolve against its folder).
pub fn check_source(path: &Path, text: &str) -> Result<compile::Checked, ConfigErrors> {
    check_text(
        text,
        &path.display().to_string(),
        path.parent().unwrap_or(Path::new(".")),
    )
}

/// Check config text; relative paths in it are resolved against `base_dir`.
pub fn check_text(
    text: &str,
    file: &str,
    base_dir: &Path,
) -> Result<compile::Checked, ConfigErrors> {
    let (cfg, json) = parse(text, file)?;
    compile::check(&cfg, json, file, base_dir)
}
