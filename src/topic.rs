//! Topics (`marketdata.quotes.AAPL`) and patterns (`marketdata.*.AAPL`, `engine.>`).
//!
//! A topic is dot-separated tokens: each token non-empty, printable ASCII without spaces, and
//! never a wildcard. A pattern may also hold the NATS-style wildcards `*` (exactly one token)
//! and `>` (one or more trailing tokens, last position only). Both are validated once, on
//! construction, and are cheap to clone afterwards.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};

/// A map keyed by topic, for lookups on the publish path: topics are short strings, hashed
/// with foldhash (seeded per process) rather than SipHash.
pub(crate) type TopicMap<V> = std::collections::HashMap<Topic, V, foldhash::fast::RandomState>;

/// The longest topic or pattern accepted, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;

/// Why a token is bad, or `None` when it is fine. `wildcards_ok` allows a lone `*` / `>`.
fn check_chars(input: &str, what: &str) -> Result<(), String> {
    if input.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if input.len() > MAX_TOPIC_LEN {
        return Err(format!(
            "{what} is {} bytes long; the limit is {MAX_TOPIC_LEN}",
            input.len()
        ));
    }
    for (i, b) in input.bytes().enumerate() {
        if b == b' ' || b == b'\t' {
            return Err(format!("{what} holds whitespace at byte {i}"));
        }
        if !(0x21..=0x7e).contains(&b) {
            return Err(format!(
                "{what} holds a control or non-ASCII byte 0x{b:02x} at byte {i}"
            ));
        }
    }
    for (i, token) in input.split('.').enumerate() {
        if token.is_empty() {
            return Err(format!(
                "{what} has an empty token at position {} (leading, trailing or doubled '.')",
                i + 1
            ));
        }
    }
    Ok(())
}

/// A validated topic: where a message is published. Never holds a wildcard.
///
/// Cloning is a reference-count increment.
#[derive(Clone)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Validates `topic`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidTopic`] with a message quoting the input when a token is empty, the
    /// topic holds whitespace, control or non-ASCII bytes, a wildcard (`*`, `>`), or is longer
    /// than [`MAX_TOPIC_LEN`].
    pub fn new(topic: impl AsRef<str>) -> Result<Topic> {
        let s = topic.as_ref();
        Self::validate(s)?;
        Ok(Topic(Arc::from(s)))
    }

    fn validate(s: &str) -> Result<()> {
        let bad = |why: String| {
            Error::new(
                ErrorKind::InvalidTopic,
                format!("invalid topic {s:?}: {why}"),
            )
        };
        check_chars(s, "topic").map_err(bad)?;
        for (i, token) in s.split('.').enumerate() {
            if token.contains(['*', '>']) {
                let why = if token == "*" || token == ">" {
                    format!(
                        "token {} is the wildcard '{token}'; wildcards belong in subscription patterns, not in published topics",
                        i + 1
                    )
                } else {
                    format!("token {} ({token:?}) holds a wildcard character", i + 1)
                };
                return Err(bad(why));
            }
        }
        Ok(())
    }

    /// The topic as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The dot-separated tokens.
    pub fn tokens(&self) -> std::str::Split<'_, char> {
        self.0.split('.')
    }
}

impl PartialEq for Topic {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}
impl Eq for Topic {}
impl Hash for Topic {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}
impl PartialOrd for Topic {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Topic {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}
impl Borrow<str> for Topic {
    fn borrow(&self) -> &str {
        &self.0
    }
}
impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        &self.0
    }
}
impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topic({:?})", &*self.0)
    }
}
impl FromStr for Topic {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Topic::new(s)
    }
}
impl TryFrom<&str> for Topic {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        Topic::new(s)
    }
}
impl TryFrom<String> for Topic {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Topic::validate(&s)?;
        Ok(Topic(Arc::from(s)))
    }
}
impl serde::Serialize for Topic {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}
impl<'de> serde::Deserialize<'de> for Topic {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Topic::try_from(s).map_err(serde::de::Error::custom)
    }
}

/// One token of a [`Pattern`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PatternToken {
    /// A literal token that must be equal.
    Literal(Box<str>),
    /// `*`: exactly one token.
    One,
    /// `>`: one or more trailing tokens.
    Rest,
}

/// A validated subscription pattern: a topic that may hold `*` and a trailing `>`.
///
/// Cloning is a reference-count increment.
#[derive(Clone)]
pub struct Pattern {
    raw: Arc<str>,
    tokens: Arc<[PatternToken]>,
}

impl Pattern {
    /// Validates `pattern`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidPattern`] with a message quoting the input when a token is empty,
    /// the pattern holds whitespace, control or non-ASCII bytes, a wildcard character inside
    /// a token (`foo*`), a `>` anywhere but last, or is longer than [`MAX_TOPIC_LEN`].
    pub fn new(pattern: impl AsRef<str>) -> Result<Pattern> {
        let s = pattern.as_ref();
        let bad = |why: String| {
            Error::new(
                ErrorKind::InvalidPattern,
                format!("invalid pattern {s:?}: {why}"),
            )
        };
        check_chars(s, "pattern").map_err(bad)?;
        let count = s.split('.').count();
        let mut tokens = Vec::with_capacity(count);
        for (i, token) in s.split('.').enumerate() {
            let t = match token {
                "*" => PatternToken::One,
                ">" if i + 1 == count => PatternToken::Rest,
                ">" => {
                    return Err(bad(format!(
                        "'>' is token {} of {count}; it may only be the last token",
                        i + 1
                    )))
                }
                _ if token.contains(['*', '>']) => {
                    return Err(bad(format!(
                        "token {} ({token:?}) mixes a wildcard with other characters; '*' and '>' must be whole tokens",
                        i + 1
                    )))
                }
                _ => PatternToken::Literal(token.into()),
            };
            tokens.push(t);
        }
        Ok(Pattern {
            raw: Arc::from(s),
            tokens: tokens.into(),
        })
    }

    /// The pattern matching exactly one topic.
    pub fn exact(topic: &Topic) -> Pattern {
        Pattern {
            raw: topic.0.clone(),
            tokens: topic
                .tokens()
                .map(|t| PatternToken::Literal(t.into()))
                .collect(),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The parsed tokens.
    pub fn tokens(&self) -> &[PatternToken] {
        &self.tokens
    }

    /// Whether the pattern holds no wildcard (it matches exactly one topic).
    pub fn is_literal(&self) -> bool {
        self.tokens
            .iter()
            .all(|t| matches!(t, PatternToken::Literal(_)))
    }

    /// The topic this pattern names when it holds no wildcard.
    pub fn as_topic(&self) -> Option<Topic> {
        self.is_literal().then(|| Topic(self.raw.clone()))
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &Topic) -> bool {
        self.matches_str(topic.as_str())
    }

    /// Whether the (already valid) topic string matches.
    pub fn matches_str(&self, topic: &str) -> bool {
        let mut parts = topic.split('.');
        for token in self.tokens.iter() {
            match token {
                PatternToken::Rest => return parts.next().is_some(),
                PatternToken::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                PatternToken::Literal(lit) => match parts.next() {
                    Some(p) if p == &**lit => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }

    /// Whether some topic matches both patterns.
    pub fn overlaps(&self, other: &Pattern) -> bool {
        fn go(a: &[PatternToken], b: &[PatternToken]) -> bool {
            match (a.first(), b.first()) {
                (None, None) => true,
                (None, Some(_)) | (Some(_), None) => false,
                (Some(PatternToken::Rest), Some(_)) | (Some(_), Some(PatternToken::Rest)) => true,
                (Some(PatternToken::Literal(x)), Some(PatternToken::Literal(y))) => {
                    x == y && go(&a[1..], &b[1..])
                }
                _ => go(&a[1..], &b[1..]),
            }
        }
        go(&self.tokens, &other.tokens)
    }

    /// Whether every topic that matches `other` also matches `self`.
    pub fn covers(&self, other: &Pattern) -> bool {
        fn go(a: &[PatternToken], b: &[PatternToken]) -> bool {
            match (a.first(), b.first()) {
                (None, None) => true,
                (None, Some(_)) | (Some(_), None) => false,
                (Some(PatternToken::Rest), Some(_)) => true,
                (Some(PatternToken::One), Some(PatternToken::Rest)) => false,
                (Some(PatternToken::One), Some(_)) => go(&a[1..], &b[1..]),
                (Some(PatternToken::Literal(x)), Some(PatternToken::Literal(y))) => {
                    x == y && go(&a[1..], &b[1..])
                }
                (Some(PatternToken::Literal(_)), Some(_)) => false,
            }
        }
        go(&self.tokens, &other.tokens)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}
impl Eq for Pattern {}
impl Hash for Pattern {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.raw.hash(state)
    }
}
impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}
impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", &*self.raw)
    }
}
impl FromStr for Pattern {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Pattern::new(s)
    }
}
impl TryFrom<&str> for Pattern {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        Pattern::new(s)
    }
}
impl From<Topic> for Pattern {
    fn from(topic: Topic) -> Self {
        Pattern::exact(&topic)
    }
}
impl serde::Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.raw)
    }
}
impl<'de> serde::Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Pattern::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn topic_errors_quote_input_and_say_why() {
        let cases = [
            ("", "empty"),
            ("a..b", "empty token at position 2"),
            (".a", "empty token at position 1"),
            ("a.", "empty token at position 2"),
            ("a b", "whitespace"),
            ("a.\u{7}", "control"),
            ("a.é", "non-ASCII"),
            ("a.*", "wildcard '*'"),
            ("a.>", "wildcard '>'"),
            ("a.foo*", "holds a wildcard character"),
        ];
        for (input, why) in cases {
            let err = Topic::new(input).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidTopic, "{input:?}");
            assert!(err.to_string().contains(&format!("{input:?}")), "{err}");
            assert!(err.to_string().contains(why), "{input:?}: {err}");
        }
        let long = "a".repeat(MAX_TOPIC_LEN + 1);
        assert!(Topic::new(&long)
            .unwrap_err()
            .to_string()
            .contains("limit is 256"));
        assert!(Topic::new("a".repeat(MAX_TOPIC_LEN)).is_ok());
    }

    #[test]
    fn pattern_errors_quote_input_and_say_why() {
        let cases = [
            ("a.>.b", "may only be the last token"),
            ("a.foo*", "whole tokens"),
            ("a.>x", "whole tokens"),
            ("a..*", "empty token"),
            ("a *", "whitespace"),
        ];
        for (input, why) in cases {
            let err = Pattern::new(input).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidPattern);
            assert!(err.to_string().contains(&format!("{input:?}")), "{err}");
            assert!(err.to_string().contains(why), "{input:?}: {err}");
        }
    }

    #[test]
    fn wildcard_semantics() {
        let p = Pattern::new("a.*").unwrap();
        assert!(p.matches(&Topic::new("a.b").unwrap()));
        assert!(!p.matches(&Topic::new("a.b.c").unwrap()));
        assert!(!p.matches(&Topic::new("a").unwrap()));
        let p = Pattern::new("a.>").unwrap();
        assert!(p.matches(&Topic::new("a.b.c").unwrap()));
        assert!(!p.matches(&Topic::new("a").unwrap()));
        let p = Pattern::new(">").unwrap();
        assert!(p.matches(&Topic::new("x").unwrap()));
        assert!(Pattern::new("a.*.c")
            .unwrap()
            .overlaps(&Pattern::new("a.b.>").unwrap()));
        assert!(!Pattern::new("a.*")
            .unwrap()
            .overlaps(&Pattern::new("a.b.>").unwrap()));
        assert!(Pattern::new("a.>")
            .unwrap()
            .covers(&Pattern::new("a.*.c").unwrap()));
        assert!(!Pattern::new("a.*")
            .unwrap()
            .covers(&Pattern::new("a.>").unwrap()));
    }

    // Reference semantics: enumerate every topic over a tiny alphabet up to 4 tokens.
    fn all_topics() -> Vec<Topic> {
        let alphabet = ["a", "b"];
        let mut out = Vec::new();
        let mut layer: Vec<String> = alphabet.iter().map(|s| s.to_string()).collect();
        for _ in 0..4 {
            out.extend(layer.iter().map(|s| Topic::new(s).unwrap()));
            layer = layer
                .iter()
                .flat_map(|p| alphabet.iter().map(move |a| format!("{p}.{a}")))
                .collect();
        }
        out
    }

    fn reference_match(p: &[&str], t: &[&str]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(&">"), Some(_)) => true,
            (Some(&"*"), Some(_)) => reference_match(&p[1..], &t[1..]),
            (Some(x), Some(y)) => x == y && reference_match(&p[1..], &t[1..]),
            _ => false,
        }
    }

    fn pattern_strategy() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop::sample::select(vec!["a", "b", "*"]), 0..3),
            prop::bool::ANY,
        )
            .prop_map(|(mut toks, rest)| {
                if rest || toks.is_empty() {
                    toks.push(">");
                }
                toks.join(".")
            })
    }

    proptest! {
        #[test]
        fn matches_agrees_with_reference(p in pattern_strategy()) {
            let pattern = Pattern::new(&p).unwrap();
            let ptoks: Vec<&str> = p.split('.').collect();
            for t in all_topics() {
                let ttoks: Vec<&str> = t.tokens().collect();
                prop_assert_eq!(pattern.matches(&t), reference_match(&ptoks, &ttoks), "{} vs {}", p, t);
            }
        }

        // Over the a/b alphabet up to 4 tokens (patterns here have at most 3 tokens, so a
        // witness, if one exists, fits), overlap and cover agree with brute force.
        #[test]
        fn overlap_and_cover_agree_with_brute_force(p in pattern_strategy(), q in pattern_strategy()) {
            let a = Pattern::new(&p).unwrap();
            let b = Pattern::new(&q).unwrap();
            let topics = all_topics();
            let common = topics.iter().any(|t| a.matches(t) && b.matches(t));
            prop_assert_eq!(a.overlaps(&b), common, "overlap {} {}", p, q);
            let covered = topics.iter().all(|t| !b.matches(t) || a.matches(t));
            prop_assert_eq!(a.covers(&b), covered, "cover {} {}", p, q);
        }

        // Over arbitrary short strings of the interesting characters: parsing never panics,
        // a valid topic is exactly a literal pattern that matches it, and a pattern
        // re-parses to itself.
        #[test]
        fn topics_are_exactly_the_literal_patterns(s in "[ab.*> \\x00-\\x7f]{0,10}") {
            let topic = Topic::new(&s);
            let pattern = Pattern::new(&s);
            if let Ok(t) = &topic {
                let p = pattern.as_ref().expect("a valid topic is a valid pattern");
                prop_assert!(p.is_literal() && p.matches(t), "{:?}", s);
                let back = p.as_topic();
                prop_assert_eq!(back.as_ref(), Some(t));
            }
            if let Ok(p) = &pattern {
                prop_assert_eq!(p.is_literal(), topic.is_ok(), "{:?}", s);
                let again = Pattern::new(p.as_str()).unwrap();
                prop_assert_eq!(&again, p);
            }
        }
    }
}
