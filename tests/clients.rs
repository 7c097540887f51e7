//! The application's package (`clients/typescript`) carries a copy of what the daemon decides:
//! the default rules and the clear types (its Lua is the daemon's own `lua/`, copied in by its
//! build). They must stay equal, or manual and automatic invalidation would drift apart.

use std::path::Path;

use clap::ValueEnum as _;
use evictd::cli::CacheType;
use evictd::cmd::invalidate::clear_type;
use evictd::core::rules::Rules;

fn package(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients/typescript")
        .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

#[test]
fn the_packages_rules_and_clear_types_are_the_daemons() {
    let file: serde_json::Value = serde_json::from_str(&package("rules.json")).unwrap();
    let tables: Vec<(String, Vec<String>)> = file["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let tags = t["tags"].as_array().unwrap();
            (
                t["table"].as_str().unwrap().to_string(),
                tags.iter()
                    .map(|t| t.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    let daemon: Vec<(String, Vec<String>)> = Rules::defaults()
        .tables()
        .iter()
        .map(|rule| {
            (
                rule.table.to_string(),
                rule.tags.iter().map(|t| t.source().to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(tables, daemon, "clients/typescript/rules.json `tables`");

    let clear_types = file["clearTypes"].as_object().unwrap();
    let mut named = 0;
    for kind in CacheType::value_variants() {
        let name = kind.to_possible_value().unwrap().get_name().to_string();
        let Some((tags, table)) = clear_type(*kind) else {
            assert!(
                !clear_types.contains_key(&name),
                "{name}: clears every table"
            );
            continue;
        };
        named += 1;
        let entry = &clear_types[&name];
        let package_tags: Vec<&str> = entry["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(package_tags, tags, "{name}: tags");
        assert_eq!(
            entry["table"].as_str().unwrap(),
            format!("public.{table}"),
            "{name}: table"
        );
    }
    assert_eq!(named, clear_types.len(), "clear types the daemon lacks");
}
