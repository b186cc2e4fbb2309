//! Logging setup (human-readable by default, JSON in production) and secret redaction.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global tracing subscriber, writing to stderr.
///
/// JSON lines when `BACKUP_LOG_FORMAT=json` or `BACKUP_ENV=production`; the level comes
/// from `RUST_LOG`, else `default_level`; audit records always pass. Calling it twice is harmless (tests do).
pub fn init(default_level: &str) {
    let json = std::env::var("BACKUP_LOG_FORMAT").is_ok_and(|v| v == "json")
        || std::env::var("BACKUP_ENV").is_ok_and(|v| v == "production");
    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Audit records and progress lines are logged at every level (see `audit`, `progress`).
    for directive in ["audit=info", "progress=info"] {
        if let Ok(directive) = directive.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.compact().try_init()
    };
}

/// Returns `url` with any password in its user-info, and the value of any query parameter
/// that names a secret (`password`, `sslpassword`, `token`, `secret`, `key`, …), replaced by
/// `***`.
///
/// Works on text, so it also redacts strings that are not valid URLs.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut redacted = redact_userinfo(base);
    if let Some(query) = query {
        let (query, fragment) = match query.split_once('#') {
            Some((query, fragment)) => (query, Some(fragment)),
            None => (query, None),
        };
        let parameters: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if names_a_secret(name) => format!("{name}=***"),
                _ => pair.to_string(),
            })
            .collect();
        redacted.push('?');
        redacted.push_str(&parameters.join("&"));
        if let Some(fragment) = fragment {
            redacted.push('#');
            redacted.push_str(fragment);
        }
    }
    redacted
}

/// Whether a query parameter's name says its value is a secret.
pub fn names_a_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "auth",
        "credential",
        "signature",
    ]
    .iter()
    .any(|word| name.contains(word))
}

fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| authority_start + i);
    let authority = &url[authority_start..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split(':').next().unwrap_or_default();
    let redacted_userinfo = if userinfo.contains(':') {
        format!("{user}:***")
    } else {
        user.to_string()
    };
    format!(
        "{}{}{}",
        &url[..authority_start],
        redacted_userinfo,
        &url[authority_start + at..]
    )
}

/// Removes every occurrence of each secret from `text` (for messages from child processes).
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    secrets
        .iter()
        .filter(|secret| secret.len() >= 3)
        .fold(text.to_string(), |acc, secret| acc.replace(secret, "***"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        let cases = [
            (
                "postgres://app:pw@db:5432/crm",
                "postgres://app:***@db:5432/crm",
            ),
            ("postgres://app@db/crm", "postgres://app@db/crm"),
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            ("http://u:p@ss@host/x?y=1", "http://u:***@host/x?y=1"),
            ("http://host:3900", "http://host:3900"),
            ("not a url", "not a url"),
            ("http://user:hunter2@[bad", "http://user:***@[bad"),
        ];
        for (input, expected) in cases {
            assert_eq!(redact_url(input), expected, "{input}");
        }
    }

    #[test]
    fn scrub_removes_secrets() {
        assert_eq!(
            scrub("password hunter2 failed", &["hunter2", ""]),
            "password *** failed"
        );
    }

    #[test]
    fn secrets_in_query_strings_are_redacted() {
        assert_eq!(
            redact_url("postgres://app@db/crm?sslmode=require&password=hunter2&sslpassword=x"),
            "postgres://app@db/crm?sslmode=require&password=***&sslpassword=***"
        );
        assert_eq!(
            redact_url("https://u:p@host/path?token=abc&q=1#frag"),
            "https://u:***@host/path?token=***&q=1#frag"
        );
        assert_eq!(
            redact_url("http://host/?x-amz-signature=zzz"),
            "http://host/?x-amz-signature=***"
        );
    }
}
