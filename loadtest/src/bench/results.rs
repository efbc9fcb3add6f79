//! Summaries across rounds, ratios to Weir, and the files a scenario leaves: JSON, Markdown and
//! SVG latency charts.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::report::{RunReport, fmt_rate, fmt_us, median};
use crate::svg;

/// One contender's figures in one section: medians over the rounds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    /// Contender name.
    pub contender: String,
    /// Throughput of every round, req/s.
    pub runs_rps: Vec<f64>,
    /// Median throughput, req/s.
    pub rps: f64,
    /// Median of the rounds' medians, µs.
    pub p50_us: f64,
    /// Median of the rounds' 90th percentiles, µs.
    pub p90_us: f64,
    /// Median of the rounds' 99th percentiles, µs.
    pub p99_us: f64,
    /// Median of the rounds' 99.9th percentiles, µs.
    pub p999_us: f64,
    /// Largest latency of all rounds, µs.
    pub max_us: f64,
    /// Errors over all rounds (no complete response).
    pub errors: u64,
    /// Non-2xx responses over all rounds.
    pub non_2xx: u64,
    /// Median over the rounds of the proxy's CPU time per response, µs (user and system, all
    /// its processes and threads). `None` for the upstream alone.
    pub cpu_us_per_response: Option<f64>,
    /// Resident memory, KiB, where the section measures it.
    pub rss_kib: Option<u64>,
    /// Free-form remark (reloads done, split observed, ...).
    pub note: String,
    /// Latency curve of the median round, for the chart.
    #[serde(skip)]
    pub curve: Vec<[f64; 2]>,
}

/// A table of a scenario: one kind of load, all contenders.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Section {
    /// Title, e.g. `small response, closed loop`.
    pub title: String,
    /// What was run (protocol, connections, rate, duration).
    pub load: String,
    /// One row per contender, in run order.
    pub rows: Vec<Row>,
    /// Every round of every contender, as measured.
    pub runs: Vec<RunReport>,
    /// Whether the table is about memory (idle connections) rather than throughput.
    pub memory: bool,
}

impl Section {
    /// Summarizes `runs` (labelled by contender) into rows, in first-seen order.
    pub fn from_runs(title: &str, load: &str, runs: Vec<RunReport>) -> Self {
        let mut names: Vec<String> = Vec::new();
        for r in &runs {
            if !names.contains(&r.label) {
                names.push(r.label.clone());
            }
        }
        let rows = names
            .iter()
            .map(|name| {
                let mine: Vec<&RunReport> = runs.iter().filter(|r| &r.label == name).collect();
                let pick = |f: fn(&RunReport) -> f64| {
                    median(&mine.iter().map(|r| f(r)).collect::<Vec<_>>()).unwrap_or(0.0)
                };
                let rps = pick(|r| r.throughput_rps);
                let median_run = mine.iter().min_by(|a, b| {
                    (a.throughput_rps - rps)
                        .abs()
                        .total_cmp(&(b.throughput_rps - rps).abs())
                });
                Row {
                    contender: name.clone(),
                    runs_rps: mine.iter().map(|r| r.throughput_rps).collect(),
                    rps,
                    p50_us: pick(|r| r.latency.p50_us),
                    p90_us: pick(|r| r.latency.p90_us),
                    p99_us: pick(|r| r.latency.p99_us),
                    p999_us: pick(|r| r.latency.p999_us),
                    max_us: mine.iter().map(|r| r.latency.max_us).fold(0.0, f64::max),
                    errors: mine.iter().map(|r| r.errors).sum(),
                    non_2xx: mine.iter().map(|r| r.non_2xx).sum(),
                    cpu_us_per_response: median(
                        &mine
                            .iter()
                            .filter_map(|r| r.proxy_cpu_us_per_response)
                            .collect::<Vec<_>>(),
                    ),
                    rss_kib: None,
                    note: String::new(),
                    curve: median_run
                        .map(|r| r.latency_curve.clone())
                        .unwrap_or_default(),
                }
            })
            .collect();
        Self {
            title: title.into(),
            load: load.into(),
            rows,
            runs,
            memory: false,
        }
    }

    /// The row of `name`.
    pub fn row(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.contender == name)
    }

    /// The row of `name`, mutable.
    pub fn row_mut(&mut self, name: &str) -> Option<&mut Row> {
        self.rows.iter_mut().find(|r| r.contender == name)
    }

    /// The section as a Markdown table, with Weir's ratio to every contender when Weir ran.
    pub fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n{}\n\n", self.title, self.load);
        // The reference is Weir, or the first Weir variant (`weir, 0 filters` in the wasm table).
        let weir = self
            .row("weir")
            .or_else(|| self.rows.iter().find(|r| r.contender.starts_with("weir")));
        let ratio = |a: f64, b: f64| {
            if a > 0.0 && b > 0.0 {
                format!("{:.2}x", a / b)
            } else {
                "-".into()
            }
        };
        let notes = self.rows.iter().any(|r| !r.note.is_empty());
        if self.memory {
            out.push_str("| contender | RSS | Weir ÷ this (above 1.00x: Weir uses more) |");
            out.push_str(if notes {
                " note |\n|---|---:|---:|---|\n"
            } else {
                "\n|---|---:|---:|\n"
            });
            for r in &self.rows {
                let rss = r.rss_kib.unwrap_or(0) as f64;
                let w = weir.and_then(|w| w.rss_kib).unwrap_or(0) as f64;
                let _ = write!(
                    out,
                    "| {} | {:.1} MiB | {} |",
                    r.contender,
                    rss / 1024.0,
                    ratio(w, rss)
                );
                let _ = writeln!(
                    out,
                    "{}",
                    if notes {
                        format!(" {} |", r.note)
                    } else {
                        String::new()
                    }
                );
            }
            return out;
        }
        out.push_str("| contender | req/s (median) | rounds | p50 | p90 | p99 | p99.9 | max | errors | non-2xx | proxy CPU per response | Weir ÷ this req/s | Weir ÷ this p99 |");
        out.push_str(if notes { " note |\n" } else { "\n" });
        out.push_str("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        out.push_str(if notes { "---|\n" } else { "\n" });
        for r in &self.rows {
            let rounds: Vec<String> = r.runs_rps.iter().map(|x| fmt_rate(*x)).collect();
            let _ = write!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.contender,
                fmt_rate(r.rps),
                rounds.join(" / "),
                fmt_us(r.p50_us),
                fmt_us(r.p90_us),
                fmt_us(r.p99_us),
                fmt_us(r.p999_us),
                fmt_us(r.max_us),
                r.errors,
                r.non_2xx,
                r.cpu_us_per_response
                    .map_or("-".into(), |us| format!("{us:.1}µs")),
                weir.map_or("-".into(), |w| ratio(w.rps, r.rps)),
                weir.map_or("-".into(), |w| ratio(w.p99_us, r.p99_us)),
            );
            let _ = writeln!(
                out,
                "{}",
                if notes {
                    format!(" {} |", r.note)
                } else {
                    String::new()
                }
            );
        }
        out
    }

    /// The latency chart of the median round of every contender.
    pub fn chart(&self) -> String {
        let series: Vec<svg::Series<'_>> = self
            .rows
            .iter()
            .map(|r| svg::Series {
                name: &r.contender,
                points: &r.curve,
            })
            .collect();
        svg::latency_chart(&self.title, &series)
    }
}

/// Facts about the machine and the run, printed above the tables.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Context {
    /// When (UTC).
    pub date: String,
    /// The exact command.
    pub command: String,
    /// Cores seen by the OS.
    pub nproc: usize,
    /// CPU model.
    pub cpu: String,
    /// Kernel release.
    pub kernel: String,
    /// Pinning of generator, upstream and proxies, or that they share all cores.
    pub placement: String,
    /// Versions of the contenders.
    pub versions: Vec<(String, String)>,
    /// Contenders that were skipped, and why.
    pub skipped: Vec<String>,
    /// Rounds, durations, connections.
    pub settings: String,
    /// `/proc/loadavg` before the scenario and when it was written: other work on the machine.
    pub load_average: String,
}

impl Context {
    /// The header of a results file.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "- date: {}", self.date);
        let _ = writeln!(out, "- command: `{}`", self.command);
        let _ = writeln!(
            out,
            "- machine: {} cores ({}), kernel {}",
            self.nproc, self.cpu, self.kernel
        );
        let _ = writeln!(out, "- placement: {}", self.placement);
        let _ = writeln!(out, "- settings: {}", self.settings);
        let _ = writeln!(out, "- load average (1, 5, 15 min): {}", self.load_average);
        for (name, version) in &self.versions {
            let _ = writeln!(out, "- {name}: {version}");
        }
        for s in &self.skipped {
            let _ = writeln!(out, "- skipped: {s}");
        }
        out
    }
}

/// Everything one scenario measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScenarioResult {
    /// Scenario name.
    pub scenario: String,
    /// Machine and run facts.
    pub context: Context,
    /// The tables.
    pub sections: Vec<Section>,
}

impl ScenarioResult {
    /// The whole result as Markdown.
    pub fn markdown(&self) -> String {
        let mut out = format!("## {}\n\n{}\n", self.scenario, self.context.markdown());
        for s in &self.sections {
            out.push('\n');
            out.push_str(&s.markdown());
        }
        out
    }

    /// Writes `SCENARIO.json`, `SCENARIO.md` and `SCENARIO-N.svg` (one chart per throughput
    /// section) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let put = |name: String, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))
        };
        put(
            format!("{}.json", self.scenario),
            &serde_json::to_string_pretty(self).map_err(|e| e.to_string())?,
        )?;
        put(format!("{}.md", self.scenario), &self.markdown())?;
        for (i, s) in self.sections.iter().enumerate().filter(|(_, s)| !s.memory) {
            put(format!("{}-{}.svg", self.scenario, i + 1), &s.chart())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::LatencySummary;

    fn run(label: &str, rps: f64, p99: f64) -> RunReport {
        RunReport {
            label: label.into(),
            throughput_rps: rps,
            latency: LatencySummary {
                p99_us: p99,
                p50_us: p99 / 2.0,
                ..Default::default()
            },
            latency_curve: vec![[0.0, p99 / 2.0], [99.0, p99]],
            errors: 1,
            ..Default::default()
        }
    }

    #[test]
    fn medians_and_ratios() {
        let runs = vec![
            run("weir", 110.0, 200.0),
            run("nginx", 100.0, 250.0),
            run("weir", 130.0, 100.0),
            run("nginx", 90.0, 300.0),
            run("weir", 120.0, 300.0),
            run("nginx", 80.0, 200.0),
        ];
        let s = Section::from_runs("small", "h1", runs);
        assert_eq!(s.rows.len(), 2);
        let w = s.row("weir").unwrap();
        assert_eq!((w.rps, w.p99_us, w.errors), (120.0, 200.0, 3));
        assert_eq!(w.runs_rps, vec![110.0, 130.0, 120.0]);
        assert_eq!(
            w.curve,
            vec![[0.0, 150.0], [99.0, 300.0]],
            "the curve of the median round"
        );
        let md = s.markdown();
        assert!(md.contains("| nginx | 90 | 100 / 90 / 80 |"), "{md}");
        assert!(
            md.contains("| 3 | 0 | - | 1.33x |"),
            "no CPU figure measured: {md}"
        );
        assert!(
            md.contains("| 1.33x | 0.80x |"),
            "Weir 120 vs nginx 90, p99 200 vs 250: {md}"
        );
        assert!(md.contains("| weir | 120 |") && md.contains("| 1.00x | 1.00x |"));
        assert!(s.chart().contains("<polyline"));
    }

    #[test]
    fn proxy_cpu_is_the_median_of_the_rounds_that_measured_it() {
        let with_cpu = |rps: f64, cpu: Option<f64>| RunReport {
            proxy_cpu_us_per_response: cpu,
            ..run("weir", rps, 1.0)
        };
        let s = Section::from_runs(
            "x",
            "y",
            vec![
                with_cpu(1.0, Some(30.0)),
                with_cpu(2.0, None),
                with_cpu(3.0, Some(20.0)),
                with_cpu(4.0, Some(26.0)),
            ],
        );
        assert_eq!(s.rows[0].cpu_us_per_response, Some(26.0));
        assert!(s.markdown().contains("| 26.0µs |"), "{}", s.markdown());
    }

    #[test]
    fn the_first_weir_variant_is_the_reference_without_plain_weir() {
        let s = Section::from_runs(
            "x",
            "y",
            vec![
                run("weir, 0 filters", 100.0, 1.0),
                run("weir, 1 filter", 80.0, 2.0),
            ],
        );
        assert!(s.markdown().contains("| weir, 1 filter | 80 | 80 |"));
        assert!(
            s.markdown().contains("| 1.25x | 0.50x |"),
            "{}",
            s.markdown()
        );
    }

    #[test]
    fn without_weir_ratios_are_dashes_and_memory_tables() {
        let mut s = Section::from_runs("x", "y", vec![run("nginx", 1.0, 1.0)]);
        assert!(s.markdown().contains("| - | - |"));
        s.memory = true;
        s.rows[0].rss_kib = Some(2048);
        s.rows[0].note = "10000 open".into();
        let md = s.markdown();
        assert!(md.contains("| nginx | 2.0 MiB | - | 10000 open |"), "{md}");
        assert!(md.contains("Weir uses more"), "{md}");
    }

    #[test]
    fn files_are_written() {
        let dir = std::env::temp_dir().join(format!("weir-results-{}", std::process::id()));
        let r = ScenarioResult {
            scenario: "demo".into(),
            context: Context {
                date: "today".into(),
                command: "weir-bench demo".into(),
                ..Default::default()
            },
            sections: vec![Section::from_runs("a", "b", vec![run("weir", 1.0, 1.0)])],
        };
        r.write(&dir).unwrap();
        assert!(
            std::fs::read_to_string(dir.join("demo.md"))
                .unwrap()
                .contains("`weir-bench demo`")
        );
        assert!(dir.join("demo.json").exists() && dir.join("demo-1.svg").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
