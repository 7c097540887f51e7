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
        println!(
            "  tag of {} members: {} s, worst PING meanwhile {} ms, longest Redis command {} ms ({} over 1 ms): {}",
            t["members"],
            t["total_s"],
            t["worst_ping_ms"],
            t["longest_command_ms"],
            t["commands_over_1ms"],
            t["longest_command"].as_str().unwrap_or("")
        );
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
    }
}
