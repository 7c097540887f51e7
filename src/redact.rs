//! Keeps secrets out of logs: connection URLs are shown with their password replaced.

/// `url` with any password replaced by `***`; text that is not a URL with credentials is
/// returned unchanged, except key/value connection strings whose `password=` is masked.
///
/// ```
/// assert_eq!(evictd::redact::redact_url("redis://:hunter2@cache:6379"), "redis://:***@cache:6379");
/// ```
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if let Some(at) = authority.rfind('@') {
            let userinfo = &authority[..at];
            let masked = match userinfo.find(':') {
                Some(colon) => format!("{}:***", &userinfo[..colon]),
                None => userinfo.to_string(),
            };
            return mask_password_param(&format!(
                "{}{}{}",
                &url[..scheme_end + 3],
                masked,
                &rest[at..]
            ));
        }
        return mask_password_param(url);
    }
    mask_password_param(url)
}

/// Masks `password=...` in query strings and libpq key/value strings.
fn mask_password_param(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let Some(start) = lower.find("password=") else {
        return text.to_string();
    };
    let value_start = start + "password=".len();
    let value_end = text[value_start..]
        .find(['&', ' ', '#'])
        .map_or(text.len(), |e| value_start + e);
    format!(
        "{}***{}",
        &text[..value_start],
        mask_password_param(&text[value_end..])
    )
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
        ];
        for (input, expected) in cases {
            assert_eq!(redact_url(input), expected, "{input}");
            assert!(!redact_url(input).contains("s3cret"));
        }
    }
}
