//! The table printed at the end of a full run.

use super::*;

pub(crate) fn print_table(report: &Value) {
    println!(
        "\nevictd benchmark — commit {}, {}",
        report["commit"].as_str().unwrap_or(""),
        report["machine"].as_str().unwrap_or("")
    );
    for r in report["results"].as_array().unwrap() {
        println!(
            "\n== {} ({}) — machine speed: {} µs per Redis lookup of a cold key",
            r["setting"].as_str().unwrap(),
            r["description"].as_str().unwrap(),
            r["redis_us_per_cold_lookup"]
        );
        let w = &r["writer"];
        println!(
            "  writers (4 clients, single-row UPDATE): {} commits/s vs {} without triggers = {:.0}%",
            w["commits_per_s_with_triggers"],
            w["commits_per_s_no_triggers"],
            w["ratio"].as_f64().unwrap_or(0.0) * 100.0
        );
        for rate in ["500", "2000"] {
            let l = &r["latency"][rate];
            println!(
                "  latency @{rate}/s (achieved {}): p50 {} ms, p90 {} ms, p99 {} ms, max {} ms, missing {}",
                l["achieved_per_s"],
                l["lag"]["p50_ms"],
                l["lag"]["p90_ms"],
                l["lag"]["p99_ms"],
                l["lag"]["max_ms"],
                l["lag"]["missing"]
            );
        }
        let s = &r["synchronous_commit_off"];
        println!(
            "  synchronous_commit=off: {} commits/s (bare {}), lag p50 {} ms, p99 {} ms, max {} ms, {}",
            s["commits_per_s"],
            s["commits_per_s_no_triggers"],
            s["lag"]["p50_ms"],
            s["lag"]["p99_ms"],
            s["lag"]["max_ms"],
            trend(&s["lag"])
        );
        for key in ["bulk_100k", "bulk_1m"] {
            let b = &r[key];
            if b.is_null() {
                continue;
            }
            println!(
                "  UPDATE {} rows: {} s bare, {} s with triggers (+{}%), {} events, first / last key gone {} / {} s after commit, precise: {}{}",
                b["rows"],
                b["statement_s_bare"],
                b["statement_s_with_triggers"],
                b["overhead_pct"],
                b["events"],
                b["commit_to_first_key_gone_s"],
                b["commit_to_last_key_gone_s"],
                b["precise"],
                match (
                    &b["runs_commit_to_last_key_gone_s"],
                    &b["runs_statement_s_bare"]
                ) {
                    (Value::Array(gone), Value::Array(bare)) => format!(
                        " (median of {}: gone {}; bare {})",
                        gone.len(),
                        join_values(gone),
                        join_values(bare)
                    ),
                    _ => String::new(),
                }
            );
        }
        let t = &r["big_tag"];
        if !t.is_null() {
            println!(
                "  tag of {} members: {} s, worst PING meanwhile {} ms, longest Redis command {} ms ({} over 1 ms): {}",
                t["members"],
                t["total_s"],
                t["worst_ping_ms"],
                t["longest_command_ms"],
                t["commands_over_1ms"],
                t["longest_command"].as_str().unwrap_or("")
            );
        }
        if !r["backlog"].is_null() {
            let b = &r["backlog"];
            println!(
                "  backlog of {} events drained in {} s = {} events/s (peak RSS {} MB, {} CPU s per 100k)",
                b["events"],
                b["drain_s"],
                b["events_per_s"],
                b["daemon_peak_rss_mb"],
                b["cpu_s_per_100k_events"]
            );
        }
        let d = &r["daemon"];
        println!(
            "  daemon: RSS idle {} MB, peak {} MB under load, {} MB with bulk; {} CPU s per 100k events",
            d["rss_idle_mb"],
            d["rss_peak_mb_load"],
            d["rss_peak_mb_with_bulk"],
            d["cpu_s_per_100k_events"]
        );
        let phases = &d["cpu_s_per_100k_events_by_phase"];
        if phases.is_object() {
            println!(
                "    of which @500/s {}, @2000/s {}, synchronous_commit=off closed loop {}",
                phases["500"], phases["2000"], phases["closed_loop"]
            );
        }
    }
}

/// One figure of [`print_versus_peer`]: where it is in a result, whether less is better, and
/// the ratio evictd must reach against the peer.
struct Versus {
    figure: &'static str,
    path: &'static [&'static str],
    lower_is_better: bool,
    target: f64,
}

/// The figures users compare, and the ratio to the peer evictd's default aims for on each.
const VERSUS: [Versus; 9] = [
    Versus {
        figure: "latency @500/s p50 (ms)",
        path: &["latency", "500", "lag", "p50_ms"],
        lower_is_better: true,
        target: 0.5,
    },
    Versus {
        figure: "latency @500/s p99 (ms)",
        path: &["latency", "500", "lag", "p99_ms"],
        lower_is_better: true,
        target: 0.5,
    },
    Versus {
        figure: "latency @2,000/s p50 (ms)",
        path: &["latency", "2000", "lag", "p50_ms"],
        lower_is_better: true,
        target: 0.5,
    },
    Versus {
        figure: "latency @2,000/s p99 (ms)",
        path: &["latency", "2000", "lag", "p99_ms"],
        lower_is_better: true,
        target: 0.5,
    },
    Versus {
        figure: "writers kept, durable commits (vs no trigger)",
        path: &["writer", "ratio"],
        lower_is_better: false,
        target: 1.25,
    },
    Versus {
        figure: "writers, synchronous_commit = off (commits/s)",
        path: &["synchronous_commit_off", "commits_per_s"],
        lower_is_better: false,
        target: 1.25,
    },
    Versus {
        figure: "UPDATE 100,000 rows: last entry gone (s)",
        path: &["bulk_100k", "commit_to_last_key_gone_s"],
        lower_is_better: true,
        target: 0.1,
    },
    Versus {
        figure: "peak RSS (MB)",
        path: &["daemon", "rss_peak_mb_with_bulk"],
        lower_is_better: true,
        target: 0.2,
    },
    Versus {
        figure: "CPU s per 100,000 events",
        path: &["daemon", "cpu_s_per_100k_events"],
        lower_is_better: true,
        target: 0.2,
    },
];

/// Each figure of `setting`'s runs beside the peer's runs (interleaved in one full run), the
/// ratio of their medians, and whether it reaches the target.
pub(crate) fn print_versus_peer(report: &Value, setting: &str) {
    let runs = |name: &str| -> Vec<&Value> {
        report["results"]
            .as_array()
            .map(|r| r.iter().filter(|r| r["setting"] == name).collect())
            .unwrap_or_default()
    };
    let (ours, peers) = (runs(setting), runs("peer"));
    let values = |results: &[&Value], path: &[&str]| -> Vec<f64> {
        results
            .iter()
            .filter_map(|r| path.iter().fold(*r, |v, key| &v[*key]).as_f64())
            .collect()
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{}", (x * 1000.0).round() / 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("\n{setting} / peer (each run, interleaved; the ratio of the medians; the target)");
    for f in &VERSUS {
        let (a, b) = (values(&ours, f.path), values(&peers, f.path));
        let ratio = median(a.clone()) / median(b.clone());
        let met = if f.lower_is_better {
            ratio <= f.target
        } else {
            ratio >= f.target
        };
        println!(
            "  {:<48} {:>24} / {:<24} = {:>5.2}×  (target {}{:.2}×: {})",
            f.figure,
            list(&a),
            list(&b),
            ratio,
            if f.lower_is_better { "≤ " } else { "≥ " },
            f.target,
            if met { "met" } else { "not met" }
        );
    }
}
