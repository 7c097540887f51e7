//! The files in `deploy/` are checked, not only written: the systemd unit verifies, the
//! configuration they ship loads, the dashboard and the alerting rules query only metrics the
//! daemon exports (and the rules pass promtool's checks and tests), the
//! container build's stage builds from exactly what it copies, and the least-privilege role
//! can run the daemon.
//! (The Kubernetes variants are rendered, validated against the Kubernetes schemas and checked
//! for what a rollout relies on by `.ci/check-kubernetes`, which `.ci/run` runs.)

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use evictd::config::{Delivery, Overrides, Settings};
use support::{Env, repo_file};

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_file(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// The shipped configuration loads and covers the same tables as the built-in rules.
#[test]
fn shipped_configuration_is_valid() {
    let settings = Settings::load(&Overrides {
        config: Some(repo_file("deploy/evictd.toml")),
        ..Overrides::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let shipped: Vec<String> = settings
        .rules
        .tables()
        .iter()
        .map(|r| r.table.to_string())
        .collect();
    let builtin: Vec<String> = Settings::defaults()
        .rules
        .tables()
        .iter()
        .map(|r| r.table.to_string())
        .collect();
    assert_eq!(shipped, builtin);
    assert_eq!(settings.http_addr.port(), 9750);
}

/// The configuration example in README.md is a valid configuration file.
#[test]
fn readme_configuration_example_is_valid() {
    let readme = read("README.md");
    let example = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a ```toml block in README.md");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evictd.toml");
    std::fs::write(&path, example).unwrap();
    let settings = Settings::load(&Overrides {
        config: Some(path),
        ..Overrides::default()
    })
    .unwrap_or_else(|e| panic!("README's example: {e}"));
    assert_eq!(settings.rules.tables().len(), 1);
    assert_eq!(settings.sweep_rate, 5000);
}

/// `systemd-analyze verify` accepts the unit (with paths pointed at this build), and it is a
/// notify service with a watchdog that does not restart-loop on a configuration error.
#[test]
fn systemd_unit_verifies() {
    let unit = read("deploy/systemd/evictd.service");
    for needle in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=always",
        "RestartPreventExitStatus=2",
        "DynamicUser=yes",
        "ProtectSystem=strict",
    ] {
        assert!(unit.contains(needle), "the unit lacks {needle}");
    }
    let analyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("systemd-analyze not found: apt-get install systemd");
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("evictd.env");
    std::fs::write(&env_file, "DATABASE_URL=postgres://localhost/postgres\n").unwrap();
    let local = unit
        .replace("/usr/local/bin/evictd", env!("CARGO_BIN_EXE_evictd"))
        .replace("/etc/evictd/evictd.env", env_file.to_str().unwrap())
        .replace(
            "/etc/evictd/evictd.toml",
            repo_file("deploy/evictd.toml").to_str().unwrap(),
        );
    let path = dir.path().join("evictd.service");
    std::fs::write(&path, local).unwrap();
    let output = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr).to_string();
    // In a container without a running systemd, verify still parses and checks the unit but
    // also complains about the missing manager; only lines about our unit count.
    let about_unit: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("evictd.service") && !l.contains("Failed to connect"))
        .collect();
    assert!(about_unit.is_empty(), "systemd-analyze verify: {said}");

    // The hardening, as systemd scores it (0 = fully locked down, 10 = unprotected).
    let security = Command::new(analyze)
        .args(["security", "--offline=true"])
        .arg(&path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout).to_string();
    let exposure: f64 = report
        .split("Overall exposure level for evictd.service:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {report}"));
    assert!(exposure <= 2.0, "exposure {exposure}: {report}");
}

/// The metric names in a PromQL expression: ours and the process's.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["evictd_", "process_"] {
        for (i, _) in expr.match_indices(prefix) {
            if expr[..i]
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                continue;
            }
            let name: String = expr[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    names
}

/// The series names a live daemon's `/metrics` serves, once it has handled an event.
async fn live_series_names() -> BTreeSet<String> {
    let env = Env::new(Delivery::Outbox).await;
    let daemon = env.start_daemon().await;
    env.sql("INSERT INTO clients (name) VALUES ('m')").await;
    env.barrier().await;
    // Counters are recorded just after Redis confirmed, so the barrier's entry can be gone a
    // moment before the events family exists: wait for it.
    let started = std::time::Instant::now();
    let metrics = loop {
        let (_, metrics) = support::http_get(&daemon.http_addr(), "/metrics");
        if metrics.contains("# TYPE evictd_events counter") || started.elapsed() > support::DEADLINE
        {
            break metrics;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Every metric the dashboard queries is one the daemon exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_exported_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/evictd-dashboard.json")).unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queried.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    assert!(queried.len() >= 12, "{queried:?}");
    let exported = live_series_names().await;
    for name in &queried {
        assert!(
            exported.contains(name),
            "the dashboard queries {name}, which /metrics does not serve: {exported:?}"
        );
    }
}

/// The alerting rules pass `promtool check rules` and their own `promtool test rules` (each
/// alert fires on what it is about, and not on a healthy daemon's figures), and every metric
/// they name is one a live daemon serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_rules_are_valid_and_name_exported_metrics() {
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("promtool not found: apt-get install prometheus");
    let folder = repo_file("deploy/prometheus");
    for args in [
        ["check", "rules", "evictd-alerts.yaml"],
        ["test", "rules", "evictd-alerts.test.yaml"],
    ] {
        let output = Command::new(promtool)
            .args(args)
            .current_dir(&folder)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let rules = read("deploy/prometheus/evictd-alerts.yaml");
    let mut named = BTreeSet::new();
    let mut alerts = 0;
    for line in rules.lines().map(str::trim) {
        if let Some(expr) = line.strip_prefix("expr:") {
            named.extend(metric_names(expr));
            alerts += 1;
        }
    }
    assert!(
        alerts >= 8 && named.len() >= 8,
        "{alerts} rules naming {named:?}"
    );
    let exported = live_series_names().await;
    for name in &named {
        assert!(
            exported.contains(name),
            "an alert names {name}, which /metrics does not serve: {exported:?}"
        );
    }
}

/// The container build is multi-stage, ends as a non-root user on a digest-pinned base, and
/// copies only what exists.
#[test]
fn dockerfile_is_multi_stage_and_copies_existing_paths() {
    let dockerfile = read("deploy/Dockerfile");
    let bases: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .collect();
    assert!(bases.len() >= 2, "expected a multi-stage build");
    for base in &bases {
        assert!(
            base.contains("@sha256:"),
            "FROM {base}: not pinned by digest"
        );
    }
    assert!(dockerfile.contains("COPY --from=build"));
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("USER ") && !l.contains("root:root") && l.contains("nonroot"))
    );
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            assert!(
                repo_file(source).exists(),
                "COPY {source}: no such path in the repository"
            );
        }
    }
}

/// The Dockerfile's build stage, step by step as written: a directory holding exactly what its
/// COPY lines bring in (nothing else of the repository), its RUN lines run there with cargo
/// offline and `--locked`, and the binary it leaves behind runs. (No container engine is
/// needed: the base image only supplies the toolchain.)
#[test]
fn dockerfile_build_stage_builds_from_its_own_context() {
    let dockerfile = read("deploy/Dockerfile");
    let mut steps = Vec::new();
    let mut pending = String::new();
    for line in dockerfile
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    {
        match line.strip_suffix('\\') {
            Some(head) => pending.push_str(head),
            None => {
                pending.push_str(line);
                steps.push(std::mem::take(&mut pending));
            }
        }
    }
    let build_stage: Vec<&String> = steps
        .iter()
        .skip_while(|s| !s.starts_with("FROM "))
        .skip(1)
        .take_while(|s| !s.starts_with("FROM "))
        .collect();
    let context = tempfile::tempdir().unwrap();
    let root = context.path();
    let mut workdir = root.to_path_buf();
    let (mut copies, mut runs) = (0, 0);
    for step in build_stage {
        let (instruction, rest) = step.split_once(' ').unwrap_or((step.as_str(), ""));
        match instruction {
            "WORKDIR" => {
                workdir = root.join(rest.trim().trim_start_matches('/'));
                std::fs::create_dir_all(&workdir).unwrap();
            }
            "COPY" => {
                let parts: Vec<&str> = rest.split_whitespace().collect();
                let (dest, sources) = parts.split_last().unwrap();
                for source in sources {
                    let target = if dest.ends_with('/') {
                        workdir.join(dest).join(source)
                    } else {
                        workdir.join(dest)
                    };
                    copy_tree(&repo_file(source), &target);
                }
                copies += 1;
            }
            "RUN" => {
                let status = Command::new("sh")
                    .arg("-c")
                    .arg(rest)
                    .current_dir(&workdir)
                    .env("CARGO_NET_OFFLINE", "true")
                    .env_remove("CARGO_TARGET_DIR")
                    .env_remove("CARGO_BUILD_TARGET_DIR")
                    .status()
                    .expect("sh");
                assert!(status.success(), "RUN {rest}: {status}");
                runs += 1;
            }
            other => panic!("the build stage uses {other}, which this test does not interpret"),
        }
    }
    assert!(
        copies >= 3 && runs >= 2,
        "{copies} COPY and {runs} RUN steps"
    );
    let binary = workdir.join("target/release/evictd");
    let output = Command::new(&binary).arg("--version").output().unwrap();
    assert!(output.status.success(), "{binary:?} --version failed");
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("evictd "));
}

/// Copies a file or a directory tree, as COPY does.
fn copy_tree(source: &Path, target: &Path) {
    if source.is_dir() {
        std::fs::create_dir_all(target).unwrap();
        for entry in std::fs::read_dir(source).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &target.join(entry.file_name()));
        }
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::copy(source, target)
            .unwrap_or_else(|e| panic!("{} -> {}: {e}", source.display(), target.display()));
    }
}

/// The probes and port of the Kubernetes Deployment match the daemon's endpoints.
#[test]
fn kubernetes_probes_match_the_endpoints() {
    let deployment = read("deploy/kubernetes/base/deployment.yaml");
    for needle in [
        "path: /healthz",
        "path: /readyz",
        "containerPort: 9750",
        "readOnlyRootFilesystem: true",
        "runAsNonRoot: true",
        "key: database-url",
    ] {
        assert!(
            deployment.contains(needle),
            "deployment.yaml lacks {needle}"
        );
    }
    // kustomize reads nothing outside its folder: the ConfigMap comes from a copy.
    assert_eq!(
        read("deploy/kubernetes/base/evictd.toml"),
        read("deploy/evictd.toml"),
        "deploy/kubernetes/base/evictd.toml differs from deploy/evictd.toml"
    );
}

/// The least-privilege role from `deploy/sql/evictd-role.sql` runs the daemon: it LISTENs,
/// drains and acknowledges the outbox, and moves a poison event aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_role_runs_the_daemon() {
    let env = Env::new(Delivery::Outbox).await;
    env.psql(&[
        "-f",
        repo_file("deploy/sql/evictd-role.sql").to_str().unwrap(),
    ]);
    // Applying it twice is harmless.
    env.psql(&[
        "-f",
        repo_file("deploy/sql/evictd-role.sql").to_str().unwrap(),
    ]);
    let url = env
        .db_url
        .replace("postgres://postgres@", "postgres://evictd_daemon@");
    let mut command = env.command(&["run", "--http-addr", "127.0.0.1:0"]);
    command
        .env("DATABASE_URL", &url)
        .stderr(std::process::Stdio::piped());
    let daemon = support::Daemon::spawn(command);
    daemon.wait_ready().await;
    let entry = env.cache("clients", &["client_configs:all"]).await;
    env.sql("INSERT INTO evictd.outbox (payload) VALUES ('poison')")
        .await;
    env.sql("INSERT INTO clients (name) VALUES ('least privilege')")
        .await;
    env.wait_gone(&[entry]).await;
    env.barrier().await;
    let dead: i64 = env
        .pg
        .query_one("SELECT count(*) FROM evictd.dead_letter", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 1);
    let output = env.run_cli(&["doctor"]);
    let mut doctor = env.command(&["doctor"]);
    doctor.env("DATABASE_URL", &url);
    let as_role = support::finish(doctor);
    assert!(
        !support::text(&as_role).contains("FAIL"),
        "doctor as the daemon's role: {}",
        support::text(&as_role)
    );
    drop(output);

    // A role made before the doorbell existed cannot say the daemon is busy: doctor says so.
    drop(daemon);
    env.sql("REVOKE UPDATE ON SEQUENCE evictd.doorbell FROM evictd_daemon")
        .await;
    let mut doctor = env.command(&["doctor"]);
    doctor.env("DATABASE_URL", &url);
    let report = support::text(&support::finish(doctor));
    assert!(
        report.contains("FAIL doorbell")
            && report.contains("role evictd_daemon cannot set the doorbell"),
        "{report}"
    );
}
