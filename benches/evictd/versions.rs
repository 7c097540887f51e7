//! The writers' cost and the latency at 500 and 2,000 commits/s on PostgreSQL 15 and on 17,
//! side by side: each version in a run of this benchmark of its own (a child process with
//! `EVICTD_PG_BIN` from `scripts/fetch-postgres`), one after the other on the same machine.

use super::*;

/// The versions compared: Debian 12's and Supabase's default for new projects.
const MAJORS: [u32; 2] = [15, 17];

/// Prefix of the lines a child run prints for the parent, one JSON object per setting.
const LINE: &str = "versions-json: ";

/// The parent: runs a child per version and prints their figures side by side.
pub(crate) fn versions_side_by_side(quick: bool, placement: bool, setting: Option<&str>) {
    let mut figures: Vec<(u32, Vec<Value>)> = Vec::new();
    for major in MAJORS {
        let fetched = std::process::Command::new("scripts/fetch-postgres")
            .arg(major.to_string())
            .output()
            .unwrap_or_else(|e| panic!("scripts/fetch-postgres: {e}"));
        assert!(
            fetched.status.success(),
            "scripts/fetch-postgres {major}: {}",
            String::from_utf8_lossy(&fetched.stderr)
        );
        let bin = String::from_utf8_lossy(&fetched.stdout).trim().to_string();
        eprintln!("PostgreSQL {major} ({bin})…");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child.arg("--versions-child").env("EVICTD_PG_BIN", &bin);
        if quick {
            child.arg("--quick");
        }
        if placement {
            child.arg("--placement");
        }
        if let Some(setting) = setting {
            child.args(["--setting", setting]);
        }
        let output = child
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run the benchmark for PostgreSQL {major}: {e}"));
        assert!(
            output.status.success(),
            "the run on PostgreSQL {major} failed"
        );
        let lines = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix(LINE))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        figures.push((major, lines));
    }
    println!(
        "\n{:<16} {:>7} | {:>22} | {:>22} | {:>22}",
        "setting",
        "server",
        "writers (vs no trigger)",
        "500/s p50 / p99 ms",
        "2,000/s p50 / p99 ms"
    );
    let settings: Vec<String> = figures[0]
        .1
        .iter()
        .map(|f| f["setting"].as_str().unwrap_or("?").to_string())
        .collect();
    for name in &settings {
        for (major, lines) in &figures {
            let Some(f) = lines.iter().find(|f| f["setting"] == name.as_str()) else {
                continue;
            };
            let lag =
                |rate: &str, p: &str| f["latency"][rate]["lag"][p].as_f64().unwrap_or(f64::NAN);
            println!(
                "{:<16} {:>7} | {:>5.0} % ({:>5.0} vs {:>5.0}/s) | {:>9.2} / {:>9.2} | {:>9.2} / {:>9.2}",
                name,
                format!("PG {major}"),
                f["writers"]["ratio"].as_f64().unwrap_or(f64::NAN) * 100.0,
                f["writers"]["with_per_s"].as_f64().unwrap_or(f64::NAN),
                f["writers"]["bare_per_s"].as_f64().unwrap_or(f64::NAN),
                lag("500", "p50_ms"),
                lag("500", "p99_ms"),
                lag("2000", "p50_ms"),
                lag("2000", "p99_ms"),
            );
        }
    }
}

/// A child: the writers' phase and the two latency phases of the full run, per setting, each
/// setting's figures printed as one JSON line.
pub(crate) async fn versions_child(lab: &Lab, selected: &[&Setting], deletions: &Deletions) {
    for setting in selected {
        eprintln!("setting {}…", setting.name);
        let db = format!("bench_{}", setting.name.replace('-', "_"));
        lab.database(&db, Some(setting)).await;
        let mut daemon = lab.start_daemon(&db, setting).await;
        keyspace_events(lab, false).await;
        let (ratio, bare, with) =
            writer_ratio(lab, &db, &mut stopped_for_baseline(setting, &mut daemon)).await;
        keyspace_events(lab, true).await;
        let mut next = 0;
        let mut latencies = serde_json::Map::new();
        for target in [500.0, 2_000.0] {
            let (achieved, lags, n) = latency(lab, &db, deletions, Some(target), next).await;
            next += n;
            latencies.insert(
                format!("{target}"),
                json!({ "achieved_per_s": achieved.round(), "lag": lags }),
            );
        }
        keyspace_events(lab, false).await;
        drop(daemon);
        let figures = json!({
            "setting": setting.name,
            "writers": { "ratio": ratio, "bare_per_s": bare.round(), "with_per_s": with.round() },
            "latency": latencies,
        });
        println!("{LINE}{figures}");
    }
}
