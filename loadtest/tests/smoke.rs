//! `weir-bench smoke` end to end: the runner starts the upstream (and Weir, when its binary was
//! built next to this one), runs the generator as a child process, and writes its files.

use std::process::Command;

#[test]
fn smoke_scenario_runs_and_writes_results() {
    let out = std::env::temp_dir().join(format!("weir-bench-smoke-test-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_weir-bench"))
        .args(["smoke", "--duration", "1s", "--warmup", "200ms", "--out"])
        .arg(&out)
        .status()
        .expect("weir-bench runs");
    assert!(status.success(), "weir-bench smoke failed: {status}");
    let md = std::fs::read_to_string(out.join("smoke.md")).expect("smoke.md written");
    assert!(md.contains("| upstream (no proxy) |"), "{md}");
    assert!(md.contains("- command: `"), "{md}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("smoke.json")).unwrap()).unwrap();
    assert_eq!(json["sections"].as_array().map(Vec::len), Some(2));
    // The proxy's CPU per response is measured; the upstream alone has no proxy.
    for row in json["sections"][0]["rows"].as_array().unwrap() {
        let cpu = &row["cpu_us_per_response"];
        match row["contender"].as_str().unwrap() {
            "upstream (no proxy)" => assert!(cpu.is_null(), "{row}"),
            _ => assert!(cpu.as_f64().is_some_and(|us| us > 0.0), "{row}"),
        }
    }
    assert!(
        std::fs::read_to_string(out.join("smoke-1.svg"))
            .unwrap()
            .starts_with("<svg")
    );
    std::fs::remove_dir_all(&out).unwrap();
}

/// A profile must never be trained on a run without Weir: `train` fails at once when the
/// binary is missing, where a scenario would skip the contender and carry on.
#[test]
fn train_fails_without_a_weir_to_train() {
    let out = std::env::temp_dir().join(format!("weir-bench-train-test-{}", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_weir-bench"))
        .args(["train", "--weir-bin", "no/such/weir", "--out"])
        .arg(&out)
        .output()
        .expect("weir-bench runs");
    assert!(!output.status.success(), "train ran without weir");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("weir binary no/such/weir not found"), "{err}");
    assert!(!out.join("train.md").exists(), "no results are written");
    let _ = std::fs::remove_dir_all(&out);
}
