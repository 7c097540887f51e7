//! Property tests over the hostile-input surface: the event parser never panics, no pattern
//! built from row values matches a key outside what its template describes, and no password
//! survives redaction, whatever it holds and wherever a connection string puts it.

use std::str::FromStr as _;

use evictd::core::event::ChangeEvent;
use evictd::core::glob::matches as glob_match;
use evictd::core::rules::{TableName, TableRule, Targets, glob_escape};
use evictd::redact::redact_url;
use proptest::prelude::*;

/// Values rich in glob metacharacters and separators.
fn hostile_value() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just('*'),
            Just('?'),
            Just('['),
            Just(']'),
            Just('\\'),
            Just(':'),
            Just('^'),
            Just('-'),
            Just('a'),
            Just('b'),
            any::<char>(),
        ],
        0..8,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

/// A password as generated ones come: any mix of the characters that end URL parts, quote or
/// escape, around a marker that nothing else in a connection string contains.
fn password() -> impl Strategy<Value = String> {
    let awkward = || {
        proptest::collection::vec(
            prop_oneof![
                Just('/'),
                Just('?'),
                Just('#'),
                Just('@'),
                Just(':'),
                Just('\''),
                Just('"'),
                Just('\\'),
                Just(' '),
                Just('&'),
                Just('='),
                Just('%'),
                Just('+'),
                Just(';'),
                Just('a'),
                any::<char>().prop_filter("printable", |c| !c.is_control()),
            ],
            0..8,
        )
        .prop_map(|chars| chars.into_iter().collect::<String>())
    };
    (awkward(), awkward()).prop_map(|(before, after)| format!("{before}{MARKER}{after}"))
}

const MARKER: &str = "Zq9S3cr3t";

/// Percent-encodes everything but ASCII letters and digits.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A value as a libpq key/value string quotes it.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A value without quotes: backslash before every space, quote and backslash.
fn unquoted(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escape = c.is_whitespace() || c == '\'' || c == '\\';
            escape.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

fn rule() -> TableRule {
    TableRule::new(
        TableName::parse("t").unwrap(),
        &["a*b:{id}".to_string(), "plain".to_string()],
        &["k:{id}:*".to_string()],
    )
    .unwrap()
}

proptest! {
    /// The parser is total: any string parses or yields an error, never a panic.
    #[test]
    fn parser_never_panics_on_any_string(payload in ".*") {
        let _ = ChangeEvent::parse(&payload);
    }

    /// Nor on JSON shaped like an event with wrong types and sizes in every field.
    #[test]
    fn parser_never_panics_on_event_shaped_json(
        v in prop_oneof![Just("1".to_string()), "[0-9]{1,3}", Just("-1".into()), Just("null".into())],
        op in prop_oneof![Just("\"UPDATE\"".to_string()), Just("\"TAGS\"".into()), Just("\"TRUNCATE\"".into()), Just("7".into()), Just("null".into()), "\"[a-z]{0,8}\""],
        table in prop_oneof![Just("\"public.products\"".to_string()), Just("\"\"".into()), Just("null".into()), Just("[]".into())],
        cols in prop_oneof![Just("[\"id\"]".to_string()), Just("[]".into()), Just("[null]".into()), Just("{}".into())],
        rows in prop_oneof![Just("[[\"x\"]]".to_string()), Just("[[]]".into()), Just("[[null,null]]".into()), Just("[1]".into()), Just("[[\"x\",1]]".into())],
        tags in prop_oneof![Just("[\"a\"]".to_string()), Just("[]".into()), Just("[\"\"]".into()), Just("[null]".into())],
    ) {
        let json = format!(r#"{{"v":{v},"op":{op},"table":{table},"cols":{cols},"rows":{rows},"tags":{tags}}}"#);
        let _ = ChangeEvent::parse(&json);
    }

    /// An escaped value matches itself and nothing else.
    #[test]
    fn escaped_value_matches_only_itself(value in hostile_value(), other in hostile_value()) {
        let pattern = glob_escape(&value);
        prop_assert!(glob_match(pattern.as_bytes(), value.as_bytes()));
        prop_assert_eq!(glob_match(pattern.as_bytes(), other.as_bytes()), other == value);
    }

    /// The key pattern a row renders for `k:{id}:*` matches exactly the keys that start with
    /// `k:<that id>:` — whatever the id contains.
    #[test]
    fn row_key_pattern_stays_inside_its_template(
        id in hostile_value(),
        other in hostile_value(),
        suffix in hostile_value(),
    ) {
        let mut targets = Targets::default();
        rule().row_targets(&[Some(&id)], &mut targets);
        let pattern = targets.key_globs.iter().next().unwrap().clone();
        for key in [format!("k:{id}:{suffix}"), format!("k:{other}:{suffix}"), format!("k:{other}"), other.clone()] {
            let expected = key.starts_with(&format!("k:{id}:"));
            prop_assert_eq!(glob_match(pattern.as_bytes(), key.as_bytes()), expected, "pattern {} key {}", pattern, key);
        }
        // Tags are exact names, never patterns.
        let tag = format!("a*b:{id}");
        prop_assert!(targets.tags.contains(&tag));
    }

    /// A table-wide glob over tag names matches exactly the names the template can produce.
    #[test]
    fn table_wide_tag_glob_matches_only_its_template(name in hostile_value(), value in hostile_value()) {
        let mut targets = Targets::default();
        rule().table_wide_targets(&mut targets);
        let glob = targets.tag_globs.iter().next().unwrap().clone();
        let produced = format!("a*b:{value}");
        prop_assert!(glob_match(glob.as_bytes(), produced.as_bytes()));
        prop_assert_eq!(
            glob_match(glob.as_bytes(), name.as_bytes()),
            name.starts_with("a*b:"),
            "glob {} name {}", glob, name
        );
    }
}

proptest! {
    /// Wherever a connection string carries a password — raw or percent-encoded in a URL's
    /// user info, in a query parameter, quoted or escaped in a key/value string — redaction
    /// leaves none of it, and what the parsers themselves find is masked too.
    #[test]
    fn no_password_survives_redaction(pw in password(), user in "[a-z]{0,6}") {
        let encoded = percent_encode(&pw);
        let texts = [
            format!("postgres://{user}:{pw}@db.example:5432/app?sslmode=require"),
            format!("postgresql://{user}:{encoded}@db.example/app"),
            format!("redis://{user}:{pw}@cache:6379/0"),
            format!("rediss://:{encoded}@cache:6380"),
            format!("postgres://db.example/app?application_name=x&password={encoded}"),
            format!("host=db.example password={} user={user}", quoted(&pw)),
            format!("password = {} host=db.example", unquoted(&pw)),
            format!("host=db.example user={user} password={}", unquoted(&pw)),
        ];
        for text in &texts {
            let shown = redact_url(text);
            prop_assert!(!shown.contains(MARKER), "{} shown as {}", text, shown);
            if let Ok(config) = tokio_postgres::Config::from_str(text)
                && let Some(found) = config.get_password()
                && found.len() >= 3
            {
                let found = String::from_utf8_lossy(found);
                prop_assert!(!shown.contains(found.as_ref()), "{} shown as {}", text, shown);
            }
        }
    }
}

#[test]
fn glob_matcher_agrees_with_redis_examples() {
    let cases = [
        ("h*llo", "heeello", true),
        ("h?llo", "hallo", true),
        ("h[ae]llo", "hillo", false),
        ("h[^e]llo", "hallo", true),
        ("h[a-b]llo", "hbllo", true),
        (r"a\*", "a*", true),
        (r"a\*", "ab", false),
    ];
    for (pattern, text, expected) in cases {
        assert_eq!(
            glob_match(pattern.as_bytes(), text.as_bytes()),
            expected,
            "{pattern} {text}"
        );
    }
}
