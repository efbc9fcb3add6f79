//! Config checking (`weir validate`) and reloads that are rejected while the old table serves.

use std::process::Command;

use crate::support::*;

/// Run `weir validate` on `yaml`: exit code, stderr (the file's path replaced by `FILE`),
/// stdout.
pub(crate) fn validate(yaml: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "FILE"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn validate_accepts_the_shipped_configs() {
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = Command::new(env!("CARGO_BIN_EXE_weir"))
                .arg("validate")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn validate_reports_file_line_column_per_error() {
    let (code, err, _) = validate(
        "listeners:\n  - { name: l, address: 127.0.0.1:0 }\nroutes:\n  - name: r\n    backends: [ { cluster: missing, weight: 0 } ]\n  - name: r\n    match: { path: { regex: \"(\" } }\n    backends: [ { cluster: c } ]\nclusters:\n  - { name: c, endpoints: [ { address: \"127.0.0.1:1\" } ] }\n",
    );
    assert_eq!(code, 1);
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines.iter().all(|l| l.starts_with("FILE:")), "{err}");
    assert!(
        err.contains("FILE:5:28: routes[r].backends[].cluster: unknown cluster `missing`"),
        "{err}"
    );
    assert!(
        err.contains("FILE:5:45: routes[r].backends[].weight: weights sum to 0"),
        "{err}"
    );
    assert!(
        err.contains("FILE:6:11: routes[].name: duplicate route name `r`"),
        "{err}"
    );
    assert!(
        err.contains(
            "FILE:7:29: routes[r].match.path.regex: invalid regular expression `(`: unclosed group"
        ),
        "{err}"
    );
    assert_eq!(lines.len(), 4, "{err}");
}

#[test]
fn validate_rejects_unknown_fields_and_bad_values_with_position() {
    let (code, err, _) = validate("listeners:\n  - name: l\n    adress: 127.0.0.1:0\n");
    assert_eq!(code, 1);
    assert!(err.starts_with("FILE:3:5: "), "{err}");
    assert!(err.contains("adress"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let (code, err, _) =
        validate("routes:\n  - name: r\n    timeout: 15\n    direct_response: { status: 200 }\n");
    assert_eq!(code, 1);
    assert!(err.starts_with("FILE:3:"), "{err}");
    assert!(err.contains("needs a unit"), "{err}");

    let (code, err, _) = validate(
        "listeners:\n  - name: l\n    address: 127.0.0.1:0\n    tls: { certificates: [ { cert: /nonexistent.pem, key: /nonexistent.key } ] }\n",
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("FILE:4:") && err.contains("cannot read certificate file `/nonexistent.pem`"),
        "{err}"
    );
}

#[test]
fn validate_ok_exits_zero() {
    let (code, err, out) = validate("routes:\n  - { name: r, direct_response: { status: 204 } }\n");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_reload_is_rejected_and_old_table_keeps_serving() {
    let good = format!(
        "{}routes:\n  - {{ name: r, direct_response: {{ status: 200, body: old }} }}\n",
        base()
    );
    let gw = gateway(&good).await;
    let addr = gw.addr("main").await;
    assert_eq!(get(addr, "x", "/", &[]).await.body, "old");
    let err = gw
        .reload(&format!(
            "{}routes:\n  - {{ name: r, backends: [ {{ cluster: nope }} ] }}\n",
            base()
        ))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(":6:39: routes[r].backends[].cluster: unknown cluster `nope`"),
        "{err}"
    );
    assert_eq!(get(addr, "x", "/", &[]).await.body, "old");
    // Through the admin API too.
    gw.write("listeners: [ {");
    let r = send(
        &client(),
        http::Request::post(format!("http://{}/reload", gw.admin()))
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("weir.yaml:1:"), "{}", r.body);
    assert_eq!(get(addr, "x", "/", &[]).await.body, "old");
    let m = admin_get(gw.admin(), "/metrics").await.body;
    assert!(m.contains("weir_config_reload_failures_total 2"), "{m}");
    // A good config then takes effect.
    gw.reload(&good.replace("body: old", "body: new"))
        .await
        .unwrap();
    assert_eq!(get(addr, "x", "/", &[]).await.body, "new");
    let dump = admin_get(gw.admin(), "/config_dump").await.json();
    assert_eq!(dump["version"], 2);
    assert_eq!(
        dump["config"]["routes"][0]["direct_response"]["body"],
        "new"
    );
}

/// `configs/weir.schema.json` and `configs/reference.md` match the code (regenerate with
/// `WEIR_BLESS=1`).
#[test]
fn reference_docs_are_current() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs");
    let schema =
        serde_json::to_string_pretty(&weir::config::reference::json_schema()).unwrap() + "\n";
    let reference = weir::config::reference::reference_markdown();
    let files = [
        (format!("{dir}/weir.schema.json"), schema),
        (format!("{dir}/reference.md"), reference),
    ];
    for (path, want) in files {
        if std::env::var_os("WEIR_BLESS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{path} is out of date: run `WEIR_BLESS=1 cargo test -p weir --test all config::reference`"
        );
    }
}
