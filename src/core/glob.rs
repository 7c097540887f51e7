//! Redis glob patterns on our side of the wire: escaping a value so it matches only itself,
//! matching a key the way Redis does (`stringmatchlen`: `*`, `?`, `[...]` with `^` and
//! ranges, `\` escapes), and [`PatternSet`], which lets one SCAN pass over the keyspace serve
//! many patterns at once instead of a pass each.
//!
//! Pure: no I/O, no async.

use std::collections::HashMap;

/// Appends `value` to `out` with every glob metacharacter (`\ * ? [ ]`) escaped.
pub fn push_glob_escaped(out: &mut String, value: &str) {
    for c in value.chars() {
        if matches!(c, '\\' | '*' | '?' | '[' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// `value` as a glob that matches exactly `value`.
///
/// ```
/// assert_eq!(evictd::core::glob::glob_escape("id*[1]"), r"id\*\[1\]");
/// ```
pub fn glob_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 4);
    push_glob_escaped(&mut out, value);
    out
}

/// Whether `text` matches glob `pattern`, as Redis' `stringmatchlen` decides (case-sensitive).
/// Every token but `*` matches exactly one byte, so one backtracking point suffices: linear in
/// practice, `O(pattern × text)` at worst, never exponential.
pub fn matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where to resume after the last `*`: the pattern after it, and the text it has eaten to.
    let mut resume: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            if pattern[p] == b'*' {
                while p < pattern.len() && pattern[p] == b'*' {
                    p += 1;
                }
                if p == pattern.len() {
                    return true;
                }
                resume = Some((p, t));
                continue;
            }
            if let Some(next) = one_byte(pattern, p, text[t]) {
                p = next;
                t += 1;
                continue;
            }
        }
        match resume {
            Some((after_star, eaten)) => {
                p = after_star;
                t = eaten + 1;
                resume = Some((after_star, eaten + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// The end of the one-byte token at `pattern[p]` if it matches `c`.
fn one_byte(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    match pattern[p] {
        b'?' => Some(p + 1),
        b'[' => bracket(pattern, p + 1, c),
        b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == c).then_some(p + 2),
        b => (b == c).then_some(p + 1),
    }
}

/// A `[...]` class starting after its `[` at `p`: where it ends, if `c` is in it. As in Redis,
/// an unclosed class runs to the end of the pattern, and ranges compare as C's signed chars.
fn bracket(pattern: &[u8], mut p: usize, c: u8) -> Option<usize> {
    let negate = pattern.get(p) == Some(&b'^');
    if negate {
        p += 1;
    }
    let mut matched = false;
    let end = loop {
        let Some(&b) = pattern.get(p) else {
            break pattern.len();
        };
        if b == b'\\' && p + 1 < pattern.len() {
            p += 1;
            matched |= pattern[p] == c;
        } else if b == b']' {
            break p + 1;
        } else if p + 2 < pattern.len() && pattern[p + 1] == b'-' {
            let signed = |x: u8| i16::from(x as i8);
            let (low, high) = (signed(b), signed(pattern[p + 2]));
            let (low, high) = (low.min(high), low.max(high));
            matched |= (low..=high).contains(&signed(c));
            p += 2;
        } else {
            matched |= b == c;
        }
        p += 1;
    };
    (matched != negate).then_some(end)
}

/// The bytes every text a pattern matches must start with: the pattern up to its first
/// unescaped metacharacter, escapes removed.
fn literal_prefix(pattern: &[u8]) -> Vec<u8> {
    let mut prefix = Vec::new();
    let mut p = 0;
    while p < pattern.len() {
        match pattern[p] {
            b'*' | b'?' | b'[' => break,
            b'\\' if p + 1 < pattern.len() => {
                prefix.push(pattern[p + 1]);
                p += 2;
            }
            b => {
                prefix.push(b);
                p += 1;
            }
        }
    }
    prefix
}

/// Many glob patterns, matched against keys as one: each pattern is filed under its literal
/// prefix, so a key is compared only with the patterns whose prefix it starts with. One SCAN
/// pass then serves them all, filtered on the server by [`PatternSet::scan_pattern`] (the
/// prefix they all share) — instead of a pass over the whole keyspace per pattern.
#[derive(Debug, Default)]
pub struct PatternSet {
    patterns: Vec<Vec<u8>>,
    /// Literal prefix → the patterns filed under it.
    by_prefix: HashMap<Vec<u8>, Vec<usize>>,
    /// The distinct prefix lengths, for the lookups of one key.
    prefix_lengths: Vec<usize>,
    /// The longest prefix shared by every pattern's literal prefix.
    common: Option<Vec<u8>>,
}

impl PatternSet {
    pub fn new<I: IntoIterator<Item = String>>(patterns: I) -> Self {
        let mut set = Self::default();
        for pattern in patterns {
            set.add(pattern.into_bytes());
        }
        set
    }

    fn add(&mut self, pattern: Vec<u8>) {
        let prefix = literal_prefix(&pattern);
        if !self.prefix_lengths.contains(&prefix.len()) {
            self.prefix_lengths.push(prefix.len());
        }
        self.common = Some(match self.common.take() {
            None => prefix.clone(),
            Some(common) => {
                let shared = common
                    .iter()
                    .zip(&prefix)
                    .take_while(|(a, b)| a == b)
                    .count();
                common[..shared].to_vec()
            }
        });
        self.by_prefix
            .entry(prefix)
            .or_default()
            .push(self.patterns.len());
        self.patterns.push(pattern);
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    /// Whether any pattern matches `key`.
    pub fn matches(&self, key: &[u8]) -> bool {
        self.prefix_lengths.iter().any(|&length| {
            key.get(..length)
                .and_then(|prefix| self.by_prefix.get(prefix))
                .is_some_and(|candidates| {
                    candidates.iter().any(|&i| matches(&self.patterns[i], key))
                })
        })
    }

    /// The MATCH pattern of the SCAN pass: the shared prefix, escaped, then `*`.
    pub fn scan_pattern(&self) -> Vec<u8> {
        let mut pattern = Vec::new();
        for &b in self.common.as_deref().unwrap_or_default() {
            if matches!(b, b'\\' | b'*' | b'?' | b'[' | b']') {
                pattern.push(b'\\');
            }
            pattern.push(b);
        }
        pattern.push(b'*');
        pattern
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_as_redis_does() {
        let cases: &[(&str, &str, bool)] = &[
            ("h*llo", "heeello", true),
            ("h*llo", "hllo", true),
            ("h*llo", "hlo", false),
            ("h?llo", "hallo", true),
            ("h?llo", "hllo", false),
            ("h[ae]llo", "hillo", false),
            ("h[ae]llo", "hello", true),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("h[b-a]llo", "hallo", true),
            (r"a\*", "a*", true),
            (r"a\*", "ab", false),
            (r"a[\]]b", "a]b", true),
            ("a[bc", "ab", true),
            ("a[bc", "ac", true),
            ("a[bc", "abc", false),
            ("*", "", true),
            ("**a**", "xxa", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("", "", true),
            ("", "a", false),
            (r"a\", r"a\", true),
            ("cache:v1:p:*", "cache:v1:p:42", true),
            ("cache:v1:p:*", "cache:v1:q:42", false),
        ];
        for &(pattern, text, expected) in cases {
            assert_eq!(
                matches(pattern.as_bytes(), text.as_bytes()),
                expected,
                "{pattern} {text}"
            );
        }
    }

    #[test]
    fn many_stars_are_not_exponential() {
        let pattern = "*a".repeat(30) + "b";
        let text = "a".repeat(200);
        assert!(!matches(pattern.as_bytes(), text.as_bytes()));
    }

    #[test]
    fn a_set_matches_what_any_of_its_patterns_matches() {
        let set = PatternSet::new(
            [
                "c:tag:products:client:*",
                "c:tag:products:id:*",
                "c:v1:\\*[ab]",
            ]
            .map(String::from),
        );
        assert_eq!(set.scan_pattern(), b"c:*");
        for (key, expected) in [
            ("c:tag:products:client:42", true),
            ("c:tag:products:id:", true),
            ("c:tag:products:all", false),
            ("c:v1:*a", true),
            ("c:v1:xa", false),
            ("d:tag:products:id:1", false),
        ] {
            assert_eq!(set.matches(key.as_bytes()), expected, "{key}");
        }
        let tags = PatternSet::new(["c:tag:a\\*:*", "c:tag:a\\*:x*"].map(String::from));
        assert_eq!(tags.scan_pattern(), b"c:tag:a\\*:*");
        assert!(PatternSet::default().is_empty());
    }
}
