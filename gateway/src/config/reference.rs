//! The config's JSON Schema (for editors) and its Markdown reference, both generated from the
//! documented schema types so they cannot drift from the code. `configs/weir.schema.json` and
//! `configs/reference.md` are checked against these by a test.

use std::fmt::Write;

use serde_json::Value;

use super::schema::Config;

/// The JSON Schema of the config file.
pub fn json_schema() -> Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(Config)).expect("a schema is JSON");
    if let Some(obj) = schema.as_object_mut() {
        obj.insert("title".into(), "Weir configuration".into());
    }
    schema
}

fn type_name(v: &Value) -> String {
    if let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or(r);
        return format!("[{name}](#{})", name.to_ascii_lowercase());
    }
    if let Some(any) = v
        .get("anyOf")
        .or_else(|| v.get("oneOf"))
        .and_then(Value::as_array)
    {
        let parts: Vec<String> = any
            .iter()
            .filter(|x| x.get("type") != Some(&Value::from("null")))
            .map(type_name)
            .collect();
        return parts.join(" or ");
    }
    match v.get("type") {
        Some(Value::String(t)) if t == "array" => {
            format!("list of {}", v.get("items").map_or("any".into(), type_name))
        }
        Some(Value::String(t)) if t == "object" => match v.get("additionalProperties") {
            Some(ap) if ap.is_object() => format!("map of {}", type_name(ap)),
            _ => "object".into(),
        },
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "any".into(),
    }
}

fn one_line(s: &str) -> String {
    s.split("\n\n")
        .map(|p| p.replace('\n', " "))
        .collect::<Vec<_>>()
        .join("<br>")
        .replace('|', "\\|")
}

fn section(out: &mut String, title: &str, def: &Value) {
    let _ = writeln!(out, "## {title}\n");
    if let Some(d) = def.get("description").and_then(Value::as_str) {
        let _ = writeln!(out, "{d}\n");
    }
    let Some(props) = def.get("properties").and_then(Value::as_object) else {
        return;
    };
    let required: Vec<&str> = def
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "| field | type | required | description |\n|---|---|---|---|"
    );
    for (name, p) in props {
        let desc = p.get("description").and_then(Value::as_str).unwrap_or("");
        let req = if required.contains(&name.as_str()) {
            "yes"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "| `{name}` | {} | {req} | {} |",
            type_name(p),
            one_line(desc)
        );
    }
    let _ = writeln!(out);
}

/// The Markdown reference of every config section and field, with defaults.
pub fn reference_markdown() -> String {
    let schema = json_schema();
    let mut out = String::from(
        "# Weir configuration reference\n\nGenerated from the documented schema types (`gateway/src/config/schema.rs`); do not edit by hand. \
Regenerate with `WEIR_BLESS=1 cargo test -p weir --test all config::reference`. The same schema, for editors, is in \
[`weir.schema.json`](weir.schema.json). Unknown fields are errors. Durations are written `250ms`, `15s`, `1m`.\n\n",
    );
    section(&mut out, "Config (the file)", &schema);
    if let Some(defs) = schema.get("$defs").and_then(Value::as_object) {
        for (name, def) in defs {
            if def.get("properties").is_some() {
                section(&mut out, name, def);
            }
        }
    }
    out
}
