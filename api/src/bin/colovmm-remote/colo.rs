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

/// The proxy's part of the status: what was compared and released (primary) or injected
/// and sent back (secondary), and the channel's drops.
fn proxy_rows(p: &Value) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    if !p.is_object() {
        return rows;
    }
    if let Some(nic) = p["nic"].as_str() {
        rows.push(vec!["proxy nic".into(), nic.to_string()]);
    }
    let pr = &p["primary"];
    if pr.is_object() {
        let c = &pr["compare"];
        rows.push(vec![
            "proxy".into(),
            format!(
                "{} mirrored; PVM {} / SVM {} packets, {} compared, {} released ({} unmatched \
                 at a checkpoint), {} mismatches, {} timeouts, {} overflows, queue {} (max {})",
                n(&pr["mirrored"]),
                n(&c["primary_packets"]),
                n(&c["secondary_packets"]),
                bytes_h(n(&c["compared_bytes"])),
                n(&c["released"]),
                n(&c["flushed"]),
                n(&c["mismatches"]),
                n(&c["timeouts"]),
                n(&c["overflows"]),
                n(&c["queue_depth"]),
                n(&c["queue_depth_max"]),
            ),
        ]);
        if let Some(d) = p["last_divergence"].as_str() {
            rows.push(vec!["divergence".into(), d.to_string()]);
        }
    }
    let se = &p["secondary"];
    if se.is_object() {
        rows.push(vec![
            "proxy".into(),
            format!(
                "{} injected, {} sent to the primary, {} stale, {} from the tap dropped{}",
                n(&se["injected"]),
                n(&se["svm_out"]),
                n(&se["stale_mirrored"]),
                n(&se["tap_dropped"]),
                if se["failed_over"].as_bool() == Some(true) {
                    ", on its own tap now"
                } else {
                    ""
                }
            ),
        ]);
    }
    let l = &p["link"];
    if l.is_object() {
        let broken = broken(l);
        rows.push(vec![
            "proxy channel".into(),
            format!(
                "{} frames sent, {} received, {} dropped (queue full), {} not injected{broken}",
                n(&l["frames_sent"]),
                n(&l["frames_received"]),
                n(&l["outbox_dropped"]),
                n(&l["inject_dropped"]),
            ),
        ]);
    }
    rows
}

/// Block replication's part of the status: per disk its sync, mirror (primary) or layers
/// (secondary), then the disk channel.
fn disk_rows(d: &Value) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let Some(disks) = d["disks"].as_array() else {
        return rows;
    };
    for disk in disks {
        let sync = &disk["sync"];
        let mut parts = vec![format!(
            "{}, {}",
            disk["name"].as_str().unwrap_or("?"),
            bytes_h(n(&disk["size"]))
        )];
        if disk["mirror"].is_object() {
            parts.push(format!(
                "sync {} {} of {} ({} of {} regions differed)",
                if disk["synced"].as_bool() == Some(true) {
                    "done,"
                } else {
                    "running,"
                },
                bytes_h(n(&sync["bytes_sent"])),
                bytes_h(n(&sync["bytes_total"])),
                n(&sync["regions_total"]),
                n(&sync["regions"]),
            ));
            let m = &disk["mirror"];
            parts.push(format!(
                "{} writes replicated ({}), {} not{}",
                n(&m["replicated"]),
                bytes_h(n(&m["bytes"])),
                n(&m["unreplicated"]),
                if m["detached"].as_bool() == Some(true) {
                    ", detached"
                } else {
                    ""
                }
            ));
        }
        let r = &disk["replica"];
        if r.is_object() {
            parts.push(format!(
                "hidden {}, active {}, {} copy-before-writes, {} applied, {} queued{}",
                bytes_h(n(&r["hidden_bytes"])),
                bytes_h(n(&r["active_bytes"])),
                n(&r["copy_before_writes"]),
                n(&disk["applied"]),
                n(&disk["queued"]),
                if n(&r["merges"]) > 0 {
                    format!(", merged ({} blocks)", n(&r["merged_blocks"]))
                } else {
                    String::new()
                }
            ));
        }
        rows.push(vec![format!("disk {}", n(&disk["disk"])), parts.join("; ")]);
    }
    let l = &d["link"];
    if l.is_object() {
        let broken = broken(l);
        rows.push(vec![
            "disk channel".into(),
            format!(
                "{} writes, {} acknowledged; {} frames sent, {} received{broken}",
                n(&d["writes"]),
                n(&d["acked"]),
                n(&l["frames_sent"]),
                n(&l["frames_received"]),
            ),
        ]);
    }
    rows
}

/// `, broken: WHY` when a channel's `link` says it broke.
fn broken(link: &Value) -> String {
    link["broken"]
        .as_str()
        .map(|b| format!(", broken: {b}"))
        .unwrap_or_default()
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
    rows.extend(proxy_rows(&v["proxy"]));
    rows.extend(disk_rows(&v["disks"]));
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_shows_the_disks_of_either_side() {
        let p = json!({"role": "primary", "state": "protected", "disks": {
            "disks": [{"disk": 0, "name": "disk0", "size": 67108864, "synced": true,
                "sync": {"bytes_sent": 3145728, "bytes_total": 3145728, "regions": 64,
                         "regions_total": 3},
                "mirror": {"replicated": 812, "bytes": 415744, "unreplicated": 0,
                           "detached": false}}],
            "writes": 815, "acked": 815,
            "link": {"frames_sent": 816, "frames_received": 816, "broken": null}
        }});
        let t = status_table(&p).unwrap();
        assert!(
            t.contains("disk 0        disk0, 64.0 MiB; sync done, 3.0 MiB of 3.0 MiB (3 of 64"),
            "{t}"
        );
        assert!(
            t.contains("812 writes replicated (406.0 KiB), 0 not"),
            "{t}"
        );
        assert!(
            t.contains("815 writes, 815 acknowledged; 816 frames sent"),
            "{t}"
        );
        let s = json!({"role": "secondary", "state": "failed-over", "disks": {
            "disks": [{"disk": 0, "name": "/srv/copy.img", "size": 1048576, "applied": 9,
                "queued": 0, "replica": {"hidden_bytes": 65536, "active_bytes": 0,
                "copy_before_writes": 4, "merges": 1, "merged_blocks": 2}}],
            "writes": 9, "acked": 9, "link": {"broken": "reading from the peer: closed"}
        }});
        let t = status_table(&s).unwrap();
        assert!(
            t.contains("/srv/copy.img, 1.0 MiB; hidden 64.0 KiB, active 0 B"),
            "{t}"
        );
        assert!(t.contains("9 applied, 0 queued, merged (2 blocks)"), "{t}");
        assert!(t.contains("broken: reading from the peer: closed"), "{t}");
    }

    #[test]
    fn the_table_shows_the_proxy_of_either_side() {
        let base = json!({"role": "primary", "state": "protected", "proxy": {
            "nic": "tap0",
            "primary": {"mirrored": 7, "compare": {"primary_packets": 5, "mismatches": 1}},
            "last_divergence": "mismatch: tcp 10.0.0.1:80",
            "link": {"frames_sent": 9, "frames_received": 4, "outbox_dropped": 0,
                     "inject_dropped": 0, "broken": null}
        }});
        let t = status_table(&base).unwrap();
        assert!(t.contains("7 mirrored; PVM 5 / SVM 0 packets"), "{t}");
        assert!(t.contains("1 mismatches"), "{t}");
        assert!(t.contains("mismatch: tcp 10.0.0.1:80"), "{t}");
        assert!(t.contains("9 frames sent, 4 received"), "{t}");
        let sec = json!({"role": "secondary", "state": "failed-over", "proxy": {
            "nic": "tap0",
            "secondary": {"injected": 3, "svm_out": 2, "failed_over": true},
            "link": {"broken": "reading from the peer: closed"}
        }});
        let t = status_table(&sec).unwrap();
        assert!(t.contains("3 injected, 2 sent to the primary"), "{t}");
        assert!(t.contains("on its own tap now"), "{t}");
        assert!(t.contains("broken: reading from the peer: closed"), "{t}");
        // No proxy (a status from before its channel was up): no proxy rows.
        let none = status_table(&json!({"role": "primary", "state": "syncing"})).unwrap();
        assert!(!none.contains("proxy"), "{none}");
    }
}
