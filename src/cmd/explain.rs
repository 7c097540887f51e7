//! `evictd explain`: what a change would invalidate — tags, key patterns and, when Redis
//! answers, the keys — without removing anything.

use std::collections::BTreeSet;

use serde_json::json;

use crate::cli::ExplainArgs;
use crate::config::{ConfigError, Settings};
use crate::core::batch::Batch;
use crate::core::event::{Change, ChangeEvent, Op, Rows, Text};
use crate::sink::{RedisSink, SinkOptions};

/// Keys listed per tag or pattern in the text output; the counts are complete, and `--json`
/// lists every key. (Listing means holding them: a tag of a million members is a million
/// names in memory, for a command an operator runs by hand.)
const SHOWN: usize = 10;

pub async fn explain(settings: &Settings, args: &ExplainArgs) -> anyhow::Result<()> {
    let usage = |message: String| ConfigError::Value {
        what: "explain arguments",
        message,
    };
    let rule = settings
        .rules
        .rule_of(&args.table)
        .map_err(|e| usage(e.to_string()))?;
    let op = Op::parse(&args.op)
        .filter(|op| *op != Op::Tags)
        .ok_or_else(|| {
            usage(format!(
                "`{}` is not insert, update, delete or truncate",
                args.op
            ))
        })?;
    let old = parse_pairs(&args.old).map_err(usage)?;
    let new = parse_pairs(&args.new).map_err(usage)?;

    let row = |pairs: &[(String, Option<String>)]| -> Vec<Option<Text<'static>>> {
        rule.columns
            .iter()
            .map(|c| {
                pairs
                    .iter()
                    .find(|(k, _)| k == c)
                    .and_then(|(_, v)| v.clone())
                    .map(|v| Text(v.into()))
            })
            .collect()
    };
    let mut rows = Vec::new();
    if matches!(op, Op::Update | Op::Delete) && !old.is_empty() {
        rows.push(row(&old));
    }
    if matches!(op, Op::Update | Op::Insert) && !new.is_empty() {
        rows.push(row(&new));
    }
    let change = if op == Op::Truncate {
        Change::TableWide
    } else {
        Change::Rows {
            columns: rule.columns.clone(),
            rows: Rows::from_nested(rows),
        }
    };
    let given: Vec<&String> = old.iter().chain(&new).map(|(k, _)| k).collect();
    let missing: Vec<&String> = rule.columns.iter().filter(|c| !given.contains(c)).collect();
    let ignored: Vec<&String> = given
        .iter()
        .copied()
        .filter(|k| !rule.columns.contains(k))
        .collect();
    let mut batch = Batch::default();
    batch.add(
        &settings.rules,
        &ChangeEvent {
            op,
            table: Some(rule.table.to_string()),
            ts_ms: None,
            change,
        },
    )?;
    let targets = batch.targets;

    let sink = RedisSink::connect(&settings.redis_url, SinkOptions::from(settings)).await;
    let mut tags: Vec<serde_json::Value> = Vec::new();
    let mut patterns: Vec<serde_json::Value> = Vec::new();
    // Every existing entry that would go, once however many tags name it.
    let mut all_keys = BTreeSet::new();
    let mut redis_error = None;
    match &sink {
        Ok(sink) => {
            let mut names: Vec<String> = targets.tags.iter().cloned().collect();
            for glob in &targets.tag_globs {
                names.extend(sink.existing_tags(glob).await?);
            }
            names.sort();
            names.dedup();
            for tag in names {
                let (size, members) = sink.members(&sink.keys().tag(&tag), usize::MAX).await?;
                let keys = sink.existing(&members).await?;
                all_keys.extend(keys.iter().cloned());
                tags.push(json!({ "tag": tag, "members": size, "keys": keys }));
            }
            for glob in &targets.key_globs {
                let keys = sink.scan(glob).await?;
                all_keys.extend(keys.iter().cloned());
                patterns.push(json!({ "pattern": glob, "keys": keys }));
            }
        }
        Err(e) => {
            redis_error = Some(e.to_string());
            tags = targets.tags.iter().map(|t| json!({ "tag": t })).collect();
            patterns = targets
                .key_globs
                .iter()
                .map(|p| json!({ "pattern": p }))
                .collect();
        }
    }
    if args.json {
        let report = json!({
            "table": rule.table.to_string(),
            "op": op.as_str(),
            "tags": tags,
            "tagGlobs": targets.tag_globs,
            "keyPatterns": patterns,
            "tableWide": !targets.wide_tables.is_empty(),
            "keysThatWouldGo": redis_error.is_none().then_some(all_keys.len()),
            "keys": redis_error.is_none().then_some(&all_keys),
            "missingColumns": missing,
            "ignoredColumns": ignored,
            "redisError": redis_error,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("{} {} would invalidate:", op.as_str(), rule.table);
    for glob in &targets.tag_globs {
        println!("  table-wide: every tag matching {glob}");
    }
    for (kind, name, list) in tags
        .iter()
        .map(|t| ("tag", &t["tag"], &t["keys"]))
        .chain(patterns.iter().map(|p| ("keys", &p["pattern"], &p["keys"])))
    {
        let name = name.as_str().unwrap_or_default();
        let Some(keys) = list.as_array() else {
            println!("  {kind} {name}");
            continue;
        };
        println!("  {kind} {name}  ({} keys)", keys.len());
        for key in keys.iter().take(SHOWN) {
            println!("    {}", key.as_str().unwrap_or_default());
        }
        if keys.len() > SHOWN {
            println!(
                "    … and {} more (--json lists them all)",
                keys.len() - SHOWN
            );
        }
    }
    if !missing.is_empty() && op != Op::Truncate {
        let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        println!(
            "  (no value given for {}: tags that need it are left out)",
            names.join(", ")
        );
    }
    match redis_error {
        None => println!(
            "{} keys would be removed; nothing was removed",
            all_keys.len()
        ),
        Some(e) => println!("redis not reachable ({e}); keys not counted"),
    }
    Ok(())
}

/// `column=value` pairs; `\N` is NULL.
fn parse_pairs(pairs: &[String]) -> Result<Vec<(String, Option<String>)>, String> {
    pairs
        .iter()
        .map(|pair| {
            let (column, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("`{pair}` is not COLUMN=VALUE"))?;
            let value = (value != "\\N").then(|| value.to_string());
            Ok((column.to_string(), value))
        })
        .collect()
}
