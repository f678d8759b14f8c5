//! `colovmm-remote`'s COLO output: the `colo-start` message and the `colo-status` table.

use api::ColoConfig;
use serde_json::Value;

use super::{bytes_h, table};

/// What `colo-start` says once the VMM accepted `spec`.
pub fn started(spec: &str) -> String {
    match ColoConfig::parse(spec) {
        Ok(c) => match (c.role, c.address()) {
            (api::ColoRole::Primary, Some(peer)) => {
                format!("COLO started as primary, replicating to {peer}")
            }
            (api::ColoRole::Secondary, Some(listen)) => {
                format!("COLO started as secondary, listening on {listen}")
            }
            (role, None) => format!("COLO started as {role}"),
        },
        Err(_) => "COLO started".into(),
    }
}

/// `100 ms` or `12.5 ms` from a JSON integer or number, `-` for anything else.
fn ms(v: &Value) -> String {
    match (v.as_u64(), v.as_f64()) {
        (Some(n), _) => format!("{n} ms"),
        (None, Some(m)) => format!("{m:.1} ms"),
        (None, None) => "-".into(),
    }
}

/// `name 1.0 ms, name 2.0 ms` from an object of numbers (`None` if it is not one or empty).
fn phases(v: &Value) -> Option<String> {
    let parts: Vec<String> = v
        .as_object()?
        .iter()
        .map(|(name, t)| format!("{name} {}", ms(t)))
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// `3.1 MiB (800 pages)`.
fn volume(bytes: &Value, pages: &Value) -> Option<String> {
    let pages = pages
        .as_u64()
        .map(|p| format!(" ({p} pages)"))
        .unwrap_or_default();
    Some(format!("{}{pages}", bytes_h(bytes.as_u64()?)))
}

/// `vm.colo-status` as a table; `None` if the reply is not an object with a role and state.
pub fn status_table(v: &Value) -> Option<String> {
    let text = |key: &str| v[key].as_str().map(String::from);
    let mut rows = vec![
        vec!["role".to_string(), text("role")?],
        vec!["state".into(), text("state")?],
    ];
    if let Some(peer) = text("peer") {
        rows.push(vec!["peer".into(), peer]);
    }
    if let Some(n) = v["checkpoints"].as_u64() {
        let mut by_reason: Vec<(String, u64)> = v["reasons"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(k, c)| Some((k.clone(), c.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default();
        by_reason.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let reasons: Vec<String> = by_reason.iter().map(|(k, c)| format!("{k} {c}")).collect();
        let detail = match reasons.is_empty() {
            true => String::new(),
            false => format!(" ({})", reasons.join(", ")),
        };
        rows.push(vec!["checkpoints".into(), format!("{n}{detail}")]);
    }
    if let Some(reason) = text("last_reason") {
        rows.push(vec!["last reason".into(), reason]);
    }
    let mut every = Vec::new();
    if let Some(i) = v["checkpoint_interval_ms"].as_u64().filter(|i| *i > 0) {
        every.push(format!("{i} ms apart"));
    }
    if let Some(c) = v["channels"].as_u64() {
        every.push(format!("{c} channel{}", if c == 1 { "" } else { "s" }));
    }
    if !every.is_empty() {
        rows.push(vec!["interval".into(), every.join(", ")]);
    }
    let p = &v["pause_ms"];
    if p.is_object() {
        rows.push(vec![
            "pause".into(),
            format!(
                "last {}, mean {}, p99 {}, max {}",
                ms(&p["last"]),
                ms(&p["mean"]),
                ms(&p["p99"]),
                ms(&p["max"])
            ),
        ]);
    }
    let last = &v["last_checkpoint"];
    let mut sizes = Vec::new();
    if let Some(mean) = volume(&v["mean_bytes"], &v["mean_pages"]) {
        sizes.push(format!("mean {mean}"));
    }
    if let Some(l) = volume(&last["bytes"], &last["pages"]) {
        let seq = last["seq"]
            .as_u64()
            .map(|s| format!(" #{s}"))
            .unwrap_or_default();
        sizes.push(format!("last{seq} {l}"));
    }
    if !sizes.is_empty() {
        rows.push(vec!["per checkpoint".into(), sizes.join("; ")]);
    }
    if let Some(mean) = phases(&v["phases_mean_ms"]) {
        rows.push(vec!["phases (mean)".into(), mean]);
    }
    if let Some(l) = phases(&last["phases_ms"]) {
        rows.push(vec!["phases (last)".into(), l]);
    }
    let hb = &v["heartbeat"];
    if hb.is_object() {
        let seen = match hb["last_seen_ms_ago"].as_f64() {
            Some(ago) => format!(", last seen {ago:.0} ms ago"),
            None => String::new(),
        };
        rows.push(vec![
            "heartbeat".into(),
            format!(
                "every {}, timeout {}{seen}",
                ms(&hb["interval_ms"]),
                ms(&hb["timeout_ms"])
            ),
        ]);
    }
    let exit = &v["exit"];
    if let Some(reason) = exit["reason"].as_str() {
        let when = match exit["during_checkpoint"].as_bool() {
            Some(true) => ", during a checkpoint",
            Some(false) => ", between checkpoints",
            None => "",
        };
        let after = exit["after_checkpoints"]
            .as_u64()
            .map(|n| format!(", after {n} checkpoints"))
            .unwrap_or_default();
        rows.push(vec!["exit".into(), format!("{reason}{when}{after}")]);
    }
    Some(table(&rows, ""))
}
