//! Keeps secrets out of what evictd prints: a connection string is shown with its password
//! replaced by `***`, wherever any parser that reads it could find one.
//!
//! Two parsers read evictd's connection strings, and they disagree. tokio-postgres takes a
//! URL's credentials up to the *first* `@` anywhere after the scheme (a password may hold `/`,
//! `?` or `#`); the `url` crate behind redis takes the authority up to the first `/`, `?`, `#`
//! and its user info up to the *last* `@` in it. So the mask runs from the first `:` of the
//! credentials to the last `@` of the whole string: more than either parser would call the
//! password when a query parameter holds an `@`, never less. Query parameters named like a
//! password are masked too. Anything else is a libpq key/value string (`host=… password=…`),
//! read as tokio-postgres reads it: spaces around `=`, quoted values with backslash escapes;
//! from a value it cannot read (an unclosed quote), everything is masked.

/// `text` with any password replaced by `***`.
///
/// ```
/// assert_eq!(evictd::redact::redact_url("redis://:hunter2@cache:6379"), "redis://:***@cache:6379");
/// assert_eq!(evictd::redact::redact_url("postgres://u:ab/cd@db/app"), "postgres://u:***@db/app");
/// ```
pub fn redact_url(text: &str) -> String {
    match scheme_end(text) {
        Some(rest_start) => redact_uri(text, rest_start),
        None => redact_key_values(text),
    }
}

/// Where what follows `scheme://` starts, if `text` starts with a URL scheme.
fn scheme_end(text: &str) -> Option<usize> {
    let colon = text.find("://")?;
    let scheme = &text[..colon];
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some(colon + 3)
}

fn redact_uri(url: &str, rest_start: usize) -> String {
    let rest = &url[rest_start..];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..rest_start]);
    let after_credentials = match rest.rfind('@') {
        Some(at) => {
            let credentials = &rest[..at];
            match credentials.find(':') {
                Some(colon) => {
                    out.push_str(&credentials[..colon]);
                    out.push_str(":***");
                }
                None => out.push_str(credentials),
            }
            at
        }
        None => 0,
    };
    let tail = &rest[after_credentials..];
    match tail.find('?') {
        Some(query) => {
            out.push_str(&tail[..=query]);
            out.push_str(&redact_query(&tail[query + 1..]));
        }
        None => out.push_str(tail),
    }
    out
}

/// Whether a parameter of this name holds a secret (`password`, `sslpassword`, …).
fn is_secret(key: &str) -> bool {
    key.to_ascii_lowercase().contains("password")
}

/// `a=1&password=x#frag` → `a=1&password=***#frag`.
fn redact_query(query: &str) -> String {
    let (params, fragment) = match query.find('#') {
        Some(hash) => query.split_at(hash),
        None => (query, ""),
    };
    let params: Vec<String> = params
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if is_secret(key) || is_secret(value) => format!("{key}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{}{fragment}", params.join("&"))
}

/// A libpq key/value string with the values of secret keys masked.
fn redact_key_values(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    loop {
        let start = at;
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        let key_start = at;
        while at < bytes.len() && !bytes[at].is_ascii_whitespace() && bytes[at] != b'=' {
            at += 1;
        }
        let key = &text[key_start..at];
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        if at >= bytes.len() || bytes[at] != b'=' {
            // No `key = value` here: nothing the parser would take as a password.
            out.push_str(&text[start..]);
            return out;
        }
        at += 1;
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        out.push_str(&text[start..at]);
        let Some(value_end) = value_end(bytes, at) else {
            // An unclosed quote: the parser gives up here, and the rest may be a secret.
            out.push_str("***");
            return out;
        };
        // A value that names a password itself (`user= password=x` gives `user` that value)
        // is masked too: whoever wrote it meant a password.
        if is_secret(key) || is_secret(&text[at..value_end]) {
            out.push_str("***");
        } else {
            out.push_str(&text[at..value_end]);
        }
        at = value_end;
        if at >= bytes.len() {
            return out;
        }
    }
}

/// Where the value starting at `at` ends (quoted: after its closing quote), as tokio-postgres
/// reads it; `None` for an unclosed quote.
fn value_end(bytes: &[u8], mut at: usize) -> Option<usize> {
    let quoted = bytes.get(at) == Some(&b'\'');
    if quoted {
        at += 1;
    }
    while at < bytes.len() {
        match bytes[at] {
            b'\\' => at += 2,
            b'\'' if quoted => return Some(at + 1),
            c if !quoted && c.is_ascii_whitespace() => return Some(at),
            _ => at += 1,
        }
    }
    (!quoted).then_some(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        let cases = [
            (
                "postgres://u:s3cret@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            ("redis://:s3cret@h:6379", "redis://:***@h:6379"),
            ("redis://u@h", "redis://u@h"),
            (
                "postgres://h/db?password=s3cret&x=1",
                "postgres://h/db?password=***&x=1",
            ),
            (
                "host=h password=s3cret user=u",
                "host=h password=*** user=u",
            ),
            ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),
            // A generated password with the characters that end a URL's authority.
            ("postgres://u:ab/s3cret@db/app", "postgres://u:***@db/app"),
            ("postgres://u:a?s3cret#b@db/app", "postgres://u:***@db/app"),
            ("redis://:ab/s3cret@127.0.0.1:1", "redis://:***@127.0.0.1:1"),
            // Key/value strings: spaces around `=`, quoted values with escapes.
            (
                "host=h password = s3cret user=u",
                "host=h password = *** user=u",
            ),
            (
                "host=h password='a s3cret \\' b' user=u",
                "host=h password=*** user=u",
            ),
            ("password=a\\ s3cret host=h", "password=*** host=h"),
            ("host='h password=s3cret", "host=***"),
            ("host=h sslpassword=s3cret", "host=h sslpassword=***"),
            // What looks like a URL inside a key/value value is still a value.
            ("host=h password=a://b@s3cret", "host=h password=***"),
            // An empty value takes the next pair as its value; a password all the same.
            ("user= password=s3cret", "user= ***"),
        ];
        for (input, expected) in cases {
            assert_eq!(redact_url(input), expected, "{input}");
            assert!(!redact_url(input).contains("s3cret"));
        }
    }

    #[test]
    fn text_without_secrets_is_unchanged() {
        for text in [
            "postgres://postgres@127.0.0.1:5432/app?sslmode=verify-full",
            "redis://127.0.0.1:6379/0",
            "host=/tmp port=5432 user=evictd dbname=app",
            "",
        ] {
            assert_eq!(redact_url(text), text);
        }
    }
}
