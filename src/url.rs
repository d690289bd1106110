//! Credentials in URLs: find them, and never print them.

/// Words that mark a key or URL part as secret.
pub(crate) const SECRET_WORDS: [&str; 5] = ["pass", "token", "secret", "nkey", "cred"];

/// Whether a config key or URL query parameter names a secret (`password`, `token`, ...).
pub(crate) fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| key.contains(w))
}

/// A URL split around its userinfo: `(scheme and "://", userinfo, the rest from the host
/// on)`; `None` without `://`.
pub fn split_userinfo(url: &str) -> Option<(&str, Option<&str>, &str)> {
    let scheme_end = url.find("://")? + 3;
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    Some(match rest[..authority_end].rfind('@') {
        Some(at) => (&url[..scheme_end], Some(&rest[..at]), &rest[at + 1..]),
        None => (&url[..scheme_end], None, rest),
    })
}

/// The secrets a URL carries: the userinfo's password (the whole userinfo when it has no
/// `:`, a token) and the values of query parameters named like a secret (`pass`,
/// `password`, `token`, ...). Empty values are left out.
pub fn url_secrets(url: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for one in url.split(',') {
        if let Some((_, Some(userinfo), _)) = split_userinfo(one) {
            out.push(userinfo.split_once(':').map_or(userinfo, |(_, p)| p));
        }
        if let Some((_, query)) = one.split_once('?') {
            for pair in query.split('&') {
                if let Some((k, v)) = pair.split_once('=') {
                    if is_secret_key(k) {
                        out.push(v);
                    }
                }
            }
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// `text` (an error from a client library, say) with every secret of `url` replaced by
/// `***`.
pub fn scrub_secrets(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact_url(url));
    for secret in url_secrets(url) {
        out = out.replace(secret, "***");
    }
    out
}

/// A URL with its password (or token) and secret query parameters replaced by `***`:
/// `redis://user:***@host:6379/0?password=***`. Comma-separated URL lists are redacted one
/// by one.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let (head, query) = match one.split_once('?') {
                Some((h, q)) => (h, Some(q)),
                None => (one, None),
            };
            let mut shown = match split_userinfo(head) {
                Some((scheme, Some(userinfo), rest)) => {
                    let user = match userinfo.split_once(':') {
                        Some((user, _)) => format!("{user}:***"),
                        None => "***".to_string(),
                    };
                    format!("{scheme}{user}@{rest}")
                }
                _ => head.to_string(),
            };
            if let Some(query) = query {
                let pairs: Vec<String> = query
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some((k, _)) if is_secret_key(k) => format!("{k}=***"),
                        _ => pair.to_string(),
                    })
                    .collect();
                shown = format!("{shown}?{}", pairs.join("&"));
            }
            shown
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every place a credential can sit in a URL, each with the secret `s3cret`.
    const SECRET_URLS: &[&str] = &[
        "redis://user:s3cret@127.0.0.1:6379/0",
        "redis://:s3cret@127.0.0.1:6379",
        "rediss://default:s3cret@127.0.0.1:6380/1?protocol=resp3",
        "redis://127.0.0.1:6379/0?password=s3cret",
        "redis+unix:///run/redis.sock?db=1&pass=s3cret",
        "unix:///run/redis.sock?user=app&password=s3cret",
        "nats://s3cret@127.0.0.1:4222",
        "nats://app:s3cret@127.0.0.1:4222,nats://127.0.0.1:4223",
        "tls://127.0.0.1:4222?token=s3cret",
    ];

    #[test]
    fn redaction_hides_every_secret_and_keeps_the_rest() {
        for url in SECRET_URLS {
            let shown = redact_url(url);
            assert!(!shown.contains("s3cret"), "{url} -> {shown}");
            assert!(shown.contains("127.0.0.1") || shown.contains("/run/redis.sock"));
            assert_eq!(url_secrets(url), ["s3cret"], "{url}");
            let scrubbed = scrub_secrets(&format!("cannot connect to {url}: bad s3cret"), url);
            assert!(!scrubbed.contains("s3cret"), "{scrubbed}");
        }
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=1&pass=s3cret"),
            "redis+unix:///run/redis.sock?db=1&pass=***"
        );
        assert_eq!(redact_url("redis://u@h:1/0?db=2"), "redis://***@h:1/0?db=2");
        assert!(url_secrets("redis://127.0.0.1:6379/0?db=2").is_empty());
    }

    #[test]
    fn userinfo_splits_from_the_authority_only() {
        assert_eq!(
            split_userinfo("nats://a:b@h:1/x@y"),
            Some(("nats://", Some("a:b"), "h:1/x@y"))
        );
        assert_eq!(
            split_userinfo("redis://h:1/0?x=a@b"),
            Some(("redis://", None, "h:1/0?x=a@b"))
        );
        assert_eq!(split_userinfo("h:1"), None);
    }
}
