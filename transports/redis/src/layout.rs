//! Stream layouts busway did not create: the `layout` section of a stream-mode bus maps topics
//! to existing stream keys and entry fields to the payload and headers, so a busway engine
//! joins a platform whose producers and consumers are not on busway, as it is.
//!
//! ```toml
//! [buses.platform.layout]
//! payload = "payload"            # the field holding the payload (default "payload")
//! timestamp = "timestamp"        # the field holding the timestamp (default: busway's `ts`)
//! timestamp_unit = "s"           # s | ms | us, decimals allowed on read (default "s")
//! headers = { source = "source_engine", correlation_id = "correlation_id" }
//!
//! [[buses.platform.layout.streams]]
//! topic = "marketdata.{message_type}"     # `{field}`: one topic token <-> an entry field
//! key = "nautilus-marketdata-streams"
//!
//! [[buses.platform.layout.streams]]
//! topic = "engine.{engine}.{message_type}"
//! key = "nautilus-{engine}-streams"       # `{field}` of the topic: part of the key
//! ```
//!
//! - **Publish**: the first `streams` entry whose `topic` template matches the topic (same
//!   token count, literal tokens equal) gives the key; each `{field}` token of the template is
//!   written as that entry field, unless the key template holds it.
//! - **Read**: the first `streams` entry whose `key` matches the key read and whose `{field}`s
//!   the entry (or the key) has gives the topic; an entry that gives no valid topic is
//!   undecodable (counted in `decode_errors`, acked, skipped), as a bad busway entry is.
//! - **Subscribe**: a pattern reads the keys of every `streams` entry its topics can fall in;
//!   a `{field}` of a key template must be a literal token of the pattern (otherwise the key
//!   is unknown and the subscription is refused). No topic index is written or read.
//! - **Fields**: `payload`, `timestamp` and the `headers` map (busway header -> field name;
//!   `id`, `source`, `content_type`, `reply_to`, `correlation_id`, or a free header's name)
//!   are read and written under their field names; other busway headers keep busway's field
//!   names (`id`, `ts`, `src`, ...); other free headers are written under their own name (with
//!   `h:` if that name is taken), and every field not mapped is read as a free header.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;
use redis::Value;
use serde::Deserialize;

use busway::topic::PatternToken;
use busway::{Headers, Message, Pattern, Topic};

use crate::stream::{busway_field, text, Field};

fn d_payload() -> String {
    "payload".to_string()
}

/// The `layout` section of a Redis stream bus: how topics map to existing stream keys and
/// entry fields to the payload and headers (see the module docs for the rules).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LayoutOptions {
    /// The field holding the payload (default: `payload`).
    #[serde(default = "d_payload")]
    pub payload: String,
    /// The field holding the timestamp, in `timestamp_unit` (default: unset, busway's `ts`
    /// field in microseconds).
    #[serde(default)]
    pub timestamp: Option<String>,
    /// The unit of `timestamp` (default: `s`, with decimals: Python's `time.time()`).
    #[serde(default)]
    pub timestamp_unit: TimestampUnit,
    /// Busway header name -> entry field name (default: none).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Topic templates and their stream keys, in order: the first that matches wins.
    #[serde(default)]
    pub streams: Vec<StreamMapping>,
}

/// The unit of a layout's timestamp field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum TimestampUnit {
    /// Seconds since the Unix epoch, with up to 6 decimals written.
    #[default]
    S,
    /// Milliseconds since the Unix epoch, with up to 3 decimals written.
    Ms,
    /// Microseconds since the Unix epoch.
    Us,
}

impl TimestampUnit {
    /// Microseconds per unit.
    fn micros(self) -> u64 {
        match self {
            TimestampUnit::S => 1_000_000,
            TimestampUnit::Ms => 1_000,
            TimestampUnit::Us => 1,
        }
    }
}

/// One `[[layout.streams]]` entry: a topic template and the stream key of its topics.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct StreamMapping {
    /// Dot-separated tokens, each literal or `{field}` (exactly one topic token).
    pub topic: String,
    /// The stream key: literal text and `{field}`s of `topic`.
    pub key: String,
}

impl StreamMapping {
    /// A mapping of the topics of template `topic` to stream key (template) `key`.
    pub fn new(topic: impl Into<String>, key: impl Into<String>) -> StreamMapping {
        StreamMapping {
            topic: topic.into(),
            key: key.into(),
        }
    }
}

impl LayoutOptions {
    /// A layout with the defaults and the given `streams`.
    pub fn new(streams: Vec<StreamMapping>) -> LayoutOptions {
        LayoutOptions {
            payload: d_payload(),
            timestamp: None,
            timestamp_unit: TimestampUnit::default(),
            headers: BTreeMap::new(),
            streams,
        }
    }
}

/// Part of a template: literal text or a `{field}`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Field(String),
}

#[derive(Debug)]
struct Rule {
    topic_text: String,
    key_text: String,
    /// One part per topic token.
    topic: Vec<Part>,
    key: Vec<Part>,
}

/// A checked [`LayoutOptions`].
#[derive(Debug)]
pub(crate) struct Layout {
    payload: String,
    timestamp: Option<(String, TimestampUnit)>,
    /// Header -> field.
    headers: Vec<(String, String)>,
    rules: Vec<Rule>,
}

fn field_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `{name}` -> `name`.
fn placeholder(token: &str) -> Option<&str> {
    token.strip_prefix('{')?.strip_suffix('}')
}

fn parse_topic(template: &str) -> Result<Vec<Part>, String> {
    if template.is_empty() {
        return Err("is empty".into());
    }
    let mut parts = Vec::new();
    for token in template.split('.') {
        match placeholder(token) {
            Some(name) if field_name(name) => {
                if parts.contains(&Part::Field(name.to_string())) {
                    return Err(format!("uses {{{name}}} twice"));
                }
                parts.push(Part::Field(name.to_string()));
            }
            Some(name) => {
                return Err(format!(
                    "{{{name}}} is not a field name (letters, digits, '_' and '-')"
                ))
            }
            None if token.contains(['{', '}']) => {
                return Err(format!(
                    "token {token:?} mixes text and a {{field}}; a field is a whole token"
                ))
            }
            None => {
                Topic::new(token).map_err(|e| format!("token {token:?}: {}", e.message()))?;
                parts.push(Part::Lit(token.to_string()));
            }
        }
    }
    Ok(parts)
}

fn parse_key(template: &str, topic: &[Part]) -> Result<Vec<Part>, String> {
    if template.is_empty() {
        return Err("is empty".into());
    }
    let mut parts = Vec::new();
    let mut rest = template;
    while !rest.is_empty() {
        match rest.find('{') {
            Some(0) => {
                let end = rest.find('}').ok_or("has a '{' without '}'")?;
                let name = &rest[1..end];
                if !field_name(name) {
                    return Err(format!("{{{name}}} is not a field name"));
                }
                if !topic.contains(&Part::Field(name.to_string())) {
                    return Err(format!(
                        "{{{name}}} is not a {{field}} of the topic template"
                    ));
                }
                if matches!(parts.last(), Some(Part::Field(_))) {
                    return Err(
                        "has two {field}s with no text between them (the key could not be read back)"
                            .into(),
                    );
                }
                parts.push(Part::Field(name.to_string()));
                rest = &rest[end + 1..];
            }
            found => {
                let end = found.unwrap_or(rest.len());
                if rest[..end].contains('}') {
                    return Err("has a '}' without '{'".into());
                }
                parts.push(Part::Lit(rest[..end].to_string()));
                rest = &rest[end..];
            }
        }
    }
    Ok(parts)
}

/// Reads `key` with key template `parts`: the `{field}` values, or `None` when it does not fit.
fn read_key<'k>(parts: &[Part], key: &'k str) -> Option<Vec<&'k str>> {
    let mut values = Vec::new();
    let mut rest = key;
    let mut i = 0;
    while i < parts.len() {
        match &parts[i] {
            Part::Lit(l) => rest = rest.strip_prefix(l.as_str())?,
            Part::Field(_) => {
                // A field takes text up to the next literal's first occurrence (or the rest).
                let end = match parts.get(i + 1) {
                    Some(Part::Lit(next)) => rest.find(next.as_str())?,
                    _ => rest.len(),
                };
                if end == 0 {
                    return None;
                }
                values.push(&rest[..end]);
                rest = &rest[end..];
            }
        }
        i += 1;
    }
    rest.is_empty().then_some(values)
}

impl Layout {
    /// Checks `o`; the error says which key is wrong and why.
    pub(crate) fn new(o: &LayoutOptions) -> Result<Layout, String> {
        if o.streams.is_empty() {
            return Err(
                "streams is empty; give at least one [[layout.streams]] with topic and key".into(),
            );
        }
        if !field_name(&o.payload) {
            return Err(format!(
                "payload {:?} is not a field name (letters, digits, '_' and '-')",
                o.payload
            ));
        }
        if let Some(t) = &o.timestamp {
            if !field_name(t) || *t == o.payload {
                return Err(format!(
                    "timestamp {t:?} must be a field name other than the payload's"
                ));
            }
        }
        let mut rules = Vec::with_capacity(o.streams.len());
        for (i, s) in o.streams.iter().enumerate() {
            let topic = parse_topic(&s.topic)
                .map_err(|why| format!("streams[{i}].topic {:?} {why}", s.topic))?;
            let key = parse_key(&s.key, &topic)
                .map_err(|why| format!("streams[{i}].key {:?} {why}", s.key))?;
            for part in &topic {
                if let Part::Field(f) = part {
                    if *f == o.payload || o.timestamp.as_deref() == Some(f) {
                        return Err(format!(
                            "streams[{i}].topic {:?}: {{{f}}} is the payload or timestamp field",
                            s.topic
                        ));
                    }
                }
            }
            rules.push(Rule {
                topic_text: s.topic.clone(),
                key_text: s.key.clone(),
                topic,
                key,
            });
        }
        let mut headers: Vec<(String, String)> = Vec::new();
        for (header, field) in &o.headers {
            if header == "timestamp" || header == "timestamp_us" || header == "payload" {
                return Err(format!(
                    "headers.{header}: use the layout's `{}` key instead",
                    if header == "payload" {
                        "payload"
                    } else {
                        "timestamp"
                    }
                ));
            }
            if header.is_empty() {
                return Err("headers: a header name is empty".into());
            }
            if !field_name(field) {
                return Err(format!(
                    "headers.{header} = {field:?} is not a field name (letters, digits, '_' and '-')"
                ));
            }
            let topic_field = rules
                .iter()
                .flat_map(|r| &r.topic)
                .any(|p| *p == Part::Field(field.clone()));
            if *field == o.payload || o.timestamp.as_ref() == Some(field) || topic_field {
                return Err(format!(
                    "headers.{header} = {field:?} is already the payload, timestamp or a topic {{field}}"
                ));
            }
            if let Some((other, _)) = headers.iter().find(|(_, f)| f == field) {
                return Err(format!(
                    "headers.{header} and headers.{other} both name field {field:?}"
                ));
            }
            headers.push((header.clone(), field.clone()));
        }
        Ok(Layout {
            payload: o.payload.clone(),
            timestamp: o.timestamp.clone().map(|t| (t, o.timestamp_unit)),
            headers,
            rules,
        })
    }

    /// Whether `topic` falls in one of the layout's streams.
    pub(crate) fn maps(&self, topic: &Topic) -> bool {
        self.route(topic).is_some()
    }

    /// The stream key of `topic` and the topic fields the entry carries.
    pub(crate) fn route(&self, topic: &Topic) -> Option<(String, Vec<(String, String)>)> {
        let tokens: Vec<&str> = topic.tokens().collect();
        let rule = self.rules.iter().find(|r| {
            r.topic.len() == tokens.len()
                && r.topic.iter().zip(&tokens).all(|(p, t)| match p {
                    Part::Lit(l) => l == t,
                    Part::Field(_) => true,
                })
        })?;
        let value = |name: &str| {
            rule.topic
                .iter()
                .zip(&tokens)
                .find(|(p, _)| matches!(p, Part::Field(f) if f == name))
                .map(|(_, t)| *t)
                .unwrap_or_default()
        };
        let mut key = String::new();
        for part in &rule.key {
            match part {
                Part::Lit(l) => key.push_str(l),
                Part::Field(f) => key.push_str(value(f)),
            }
        }
        let fields = rule
            .topic
            .iter()
            .filter_map(|p| match p {
                Part::Field(f) if !rule.key.contains(p) => Some((f.clone(), value(f).to_string())),
                _ => None,
            })
            .collect();
        Some((key, fields))
    }

    /// The keys a subscription to `pattern` reads.
    pub(crate) fn keys_for(&self, pattern: &Pattern) -> Result<Vec<String>, String> {
        let pt = pattern.tokens();
        let mut keys: Vec<String> = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let mut bound: Vec<(&str, &str)> = Vec::new();
            let mut fits = true;
            let mut rest_at = None;
            for (j, part) in rule.topic.iter().enumerate() {
                match (pt.get(j), part) {
                    (None, _) => {
                        fits = false;
                        break;
                    }
                    (Some(PatternToken::Rest), _) => {
                        rest_at = Some(j);
                        break;
                    }
                    (Some(PatternToken::One), _) => {}
                    (Some(PatternToken::Literal(l)), Part::Lit(x)) => {
                        if **l != **x {
                            fits = false;
                            break;
                        }
                    }
                    (Some(PatternToken::Literal(l)), Part::Field(f)) => bound.push((f, l)),
                }
            }
            if !fits || (rest_at.is_none() && pt.len() != rule.topic.len()) {
                continue;
            }
            let mut key = String::new();
            for part in &rule.key {
                match part {
                    Part::Lit(l) => key.push_str(l),
                    Part::Field(f) => match bound.iter().find(|(b, _)| b == f) {
                        Some((_, v)) => key.push_str(v),
                        None => {
                            return Err(format!(
                                "pattern {:?} leaves {{{f}}} of layout.streams[{i}].key {:?} open; subscribe with a literal token in its place",
                                pattern.as_str(),
                                rule.key_text
                            ))
                        }
                    },
                }
            }
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            let topics: Vec<&str> = self.rules.iter().map(|r| r.topic_text.as_str()).collect();
            return Err(format!(
                "pattern {:?} matches no topic of the layout's streams ({})",
                pattern.as_str(),
                topics.join(", ")
            ));
        }
        Ok(keys)
    }

    /// The keys known without a subscription: those of key templates without a `{field}`.
    pub(crate) fn literal_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        for r in &self.rules {
            if let [Part::Lit(k)] = r.key.as_slice() {
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
        keys
    }

    /// A message's entry fields: the topic fields from [`route`](Self::route), the payload,
    /// the timestamp and the headers.
    pub(crate) fn fields(
        &self,
        message: Message,
        topic_fields: Vec<(String, String)>,
    ) -> Vec<Field> {
        let h = message.headers;
        let mut f: Vec<Field> = Vec::with_capacity(3 + topic_fields.len() + h.extra.len());
        f.push((Cow::Owned(self.payload.clone()), message.payload));
        for (k, v) in topic_fields {
            f.push((Cow::Owned(k), Bytes::from(v)));
        }
        if let Some(us) = h.timestamp_us {
            match &self.timestamp {
                Some((name, unit)) => f.push((
                    Cow::Owned(name.clone()),
                    Bytes::from(format_time(us, *unit)),
                )),
                None => f.push((Cow::Borrowed("ts"), Bytes::from(us.to_string()))),
            }
        }
        let known = [
            ("id", "id", h.id),
            ("source", "src", h.source),
            ("content_type", "ct", h.content_type),
            (
                "reply_to",
                "reply_to",
                h.reply_to.map(|t| t.as_str().to_string()),
            ),
            ("correlation_id", "corr", h.correlation_id),
        ];
        for (header, own, value) in known {
            if let Some(v) = value {
                let name = match self.field_of(header) {
                    Some(field) => Cow::Owned(field.to_string()),
                    None => Cow::Borrowed(own),
                };
                f.push((name, Bytes::from(v)));
            }
        }
        for (k, v) in h.extra {
            let name = match self.field_of(&k) {
                Some(field) => field.to_string(),
                None if self.taken(&k) || f.iter().any(|(n, _)| *n == k) => format!("h:{k}"),
                None => k,
            };
            f.push((Cow::Owned(name), Bytes::from(v)));
        }
        f
    }

    fn field_of(&self, header: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(h, _)| h == header)
            .map(|(_, f)| f.as_str())
    }

    /// Whether a field name means something else than a free header of that name.
    fn taken(&self, name: &str) -> bool {
        name == self.payload
            || self.timestamp.as_ref().is_some_and(|(t, _)| t == name)
            || self.headers.iter().any(|(_, f)| f == name)
            || self
                .rules
                .iter()
                .flat_map(|r| &r.topic)
                .any(|p| matches!(p, Part::Field(f) if f == name))
            || matches!(name, "id" | "ts" | "src" | "ct" | "reply_to" | "corr")
            || name.starts_with("h:")
    }

    /// Decodes an entry of `key`: its topic from the first stream whose key and `{field}`s fit.
    pub(crate) fn decode(&self, key: &str, fields: Vec<Value>) -> Result<Message, String> {
        let mut named: Vec<(String, Value)> = Vec::with_capacity(fields.len() / 2);
        let mut it = fields.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            named.push((text(k).ok_or("a field name is not text")?, v));
        }
        let (topic, rule) = self.topic_of(key, &named)?;
        let mut payload = None;
        let mut h = Headers::default();
        for (k, v) in named {
            if k == self.payload {
                match v {
                    Value::BulkString(b) => payload = Some(Bytes::from(b)),
                    _ => return Err(format!("{k} is not a string")),
                }
                continue;
            }
            if rule
                .topic
                .iter()
                .any(|p| matches!(p, Part::Field(f) if *f == k))
            {
                continue; // in the topic
            }
            let v = text(v).ok_or_else(|| format!("field {k:?} is not UTF-8"))?;
            if let Some((_, unit)) = self.timestamp.as_ref().filter(|(t, _)| *t == k) {
                h.timestamp_us = Some(parse_time(&v, *unit).ok_or_else(|| {
                    format!("{k} {v:?} is not a time in {unit:?} since the epoch")
                })?);
                continue;
            }
            match self.headers.iter().find(|(_, f)| *f == k) {
                Some((header, _)) => match header.as_str() {
                    "id" => h.id = Some(v),
                    "source" => h.source = Some(v),
                    "content_type" => h.content_type = Some(v),
                    "reply_to" => h.reply_to = Some(Topic::new(&v).map_err(|e| e.to_string())?),
                    "correlation_id" => h.correlation_id = Some(v),
                    other => h.extra.push((other.to_string(), v)),
                },
                None => busway_field(&mut h, k, v)?,
            }
        }
        Ok(Message {
            topic,
            payload: payload.ok_or_else(|| format!("no {} field", self.payload))?,
            headers: h,
        })
    }

    fn topic_of(&self, key: &str, named: &[(String, Value)]) -> Result<(Topic, &Rule), String> {
        let mut why = None;
        for rule in &self.rules {
            let Some(from_key) = read_key(&rule.key, key) else {
                continue;
            };
            let key_value = |name: &str| {
                rule.key
                    .iter()
                    .filter(|p| matches!(p, Part::Field(_)))
                    .zip(&from_key)
                    .find(|(p, _)| matches!(p, Part::Field(f) if f == name))
                    .map(|(_, v)| v.to_string())
            };
            let mut topic = String::new();
            let mut missing = None;
            for part in &rule.topic {
                if !topic.is_empty() {
                    topic.push('.');
                }
                match part {
                    Part::Lit(l) => topic.push_str(l),
                    Part::Field(f) => {
                        let v = key_value(f).or_else(|| {
                            named
                                .iter()
                                .find(|(k, _)| k == f)
                                .and_then(|(_, v)| text(v.clone()))
                        });
                        match v {
                            Some(v) => topic.push_str(&v),
                            None => {
                                missing = Some(f.clone());
                                break;
                            }
                        }
                    }
                }
            }
            match missing {
                Some(f) => {
                    why.get_or_insert_with(|| {
                        format!(
                            "no field {f:?} for the topic template {:?}",
                            rule.topic_text
                        )
                    });
                }
                None => match Topic::new(&topic) {
                    Ok(t) if t.tokens().count() == rule.topic.len() => return Ok((t, rule)),
                    _ => {
                        why.get_or_insert_with(|| {
                            format!(
                                "the fields give {topic:?}, not a topic of template {:?}",
                                rule.topic_text
                            )
                        });
                    }
                },
            }
        }
        Err(why.unwrap_or_else(|| format!("key {key:?} is in no layout.streams key")))
    }
}

/// `us` microseconds since the epoch in `unit`, decimals for the part below a unit.
fn format_time(us: u64, unit: TimestampUnit) -> String {
    match unit {
        TimestampUnit::S => format!("{}.{:06}", us / 1_000_000, us % 1_000_000),
        TimestampUnit::Ms => format!("{}.{:03}", us / 1_000, us % 1_000),
        TimestampUnit::Us => us.to_string(),
    }
}

/// A time in `unit` (digits, optionally `.` and decimals; or any float) as microseconds.
fn parse_time(v: &str, unit: TimestampUnit) -> Option<u64> {
    let per = unit.micros();
    let (whole, frac) = v.split_once('.').unwrap_or((v, ""));
    if !whole.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
    {
        // Exact: decimals beyond a microsecond are cut.
        let digits = per.ilog10() as usize;
        let mut sub = String::from(&frac[..frac.len().min(digits)]);
        while sub.len() < digits {
            sub.push('0');
        }
        let sub: u64 = if sub.is_empty() { 0 } else { sub.parse().ok()? };
        return whole
            .parse::<u64>()
            .ok()?
            .checked_mul(per)?
            .checked_add(sub);
    }
    let x: f64 = v.parse().ok()?;
    let us = x * per as f64;
    (us.is_finite() && us >= 0.0 && us < u64::MAX as f64).then_some(us.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nautilus() -> Layout {
        let mut o = LayoutOptions::new(vec![
            StreamMapping::new("marketdata.{message_type}", "nautilus-marketdata-streams"),
            StreamMapping::new(
                "engine.{engine}.{message_type}",
                "nautilus-{engine}-streams",
            ),
        ]);
        o.timestamp = Some("timestamp".into());
        o.headers.insert("source".into(), "source_engine".into());
        o.headers
            .insert("correlation_id".into(), "correlation_id".into());
        Layout::new(&o).unwrap()
    }

    fn values(f: &[Field]) -> Vec<Value> {
        f.iter()
            .flat_map(|(k, v)| {
                [
                    Value::BulkString(k.as_bytes().to_vec()),
                    Value::BulkString(v.to_vec()),
                ]
            })
            .collect()
    }

    #[test]
    fn nautilus_entries_round_trip() {
        let l = nautilus();
        let mut m = Message::try_new("engine.portfolio.order_fill", &b"{}"[..]).unwrap();
        m.headers.timestamp_us = Some(1_733_353_681_123_456);
        m.headers.source = Some("collateral".into());
        m.headers.correlation_id = Some("c-1".into());
        m.headers.id = Some("i-1".into());
        m.headers.insert("priority", "high");
        m.headers.insert("message_type", "clash");
        let (key, topic_fields) = l.route(&m.topic).unwrap();
        assert_eq!(key, "nautilus-portfolio-streams");
        assert_eq!(
            topic_fields,
            vec![("message_type".to_string(), "order_fill".to_string())]
        );
        let f = l.fields(m.clone(), topic_fields);
        let names: Vec<&str> = f.iter().map(|(k, _)| &**k).collect();
        assert_eq!(
            names,
            [
                "payload",
                "message_type",
                "timestamp",
                "id",
                "source_engine",
                "correlation_id",
                "priority",
                "h:message_type"
            ]
        );
        assert_eq!(&f[2].1[..], b"1733353681.123456");
        assert_eq!(l.decode(&key, values(&f)).unwrap(), m);
    }

    #[test]
    fn foreign_entries_decode_with_float_seconds_and_free_fields() {
        let l = nautilus();
        let entry: Vec<Value> = [
            ("message_type", "quote"),
            ("source_engine", "feed"),
            ("source_instance", "2"),
            ("payload", "{\"px\":1}"),
            ("timestamp", "1733353681.1234567"),
        ]
        .iter()
        .flat_map(|(k, v)| {
            [
                Value::BulkString(k.as_bytes().to_vec()),
                Value::BulkString(v.as_bytes().to_vec()),
            ]
        })
        .collect();
        let m = l
            .decode("nautilus-marketdata-streams", entry.clone())
            .unwrap();
        assert_eq!(m.topic.as_str(), "marketdata.quote");
        assert_eq!(m.headers.source.as_deref(), Some("feed"));
        assert_eq!(m.headers.timestamp_us, Some(1_733_353_681_123_456));
        assert_eq!(m.headers.get("source_instance"), Some("2"));
        assert_eq!(&m.payload[..], b"{\"px\":1}");
        // `nautilus-{engine}-streams` reads `engine` back from the key.
        let m = l.decode("nautilus-trade-streams", entry.clone()).unwrap();
        assert_eq!(m.topic.as_str(), "engine.trade.quote");
        let e = l.decode("legacy-orders", entry.clone()).unwrap_err();
        assert!(e.contains("legacy-orders"), "{e}");
        let e = l
            .decode("nautilus-marketdata-streams", entry[2..].to_vec())
            .unwrap_err();
        assert!(e.contains("message_type"), "{e}");
    }

    #[test]
    fn patterns_find_keys_or_say_why_not() {
        let l = nautilus();
        let keys = |p: &str| l.keys_for(&Pattern::new(p).unwrap());
        assert_eq!(
            keys("marketdata.>").unwrap(),
            ["nautilus-marketdata-streams"]
        );
        assert_eq!(
            keys("marketdata.quote").unwrap(),
            ["nautilus-marketdata-streams"]
        );
        assert_eq!(
            keys("engine.portfolio.*").unwrap(),
            ["nautilus-portfolio-streams"]
        );
        let e = keys("engine.*.fill").unwrap_err();
        assert!(
            e.contains("{engine}") && e.contains("nautilus-{engine}-streams"),
            "{e}"
        );
        let e = keys("other.>").unwrap_err();
        assert!(e.contains("matches no topic"), "{e}");
        assert!(keys("marketdata.a.b").is_err());
        assert_eq!(l.literal_keys(), ["nautilus-marketdata-streams"]);
        assert!(!l.maps(&Topic::new("marketdata").unwrap()));
    }

    #[test]
    fn bad_layouts_are_refused_naming_the_entry() {
        let bad = |topic: &str, key: &str| {
            Layout::new(&LayoutOptions::new(vec![StreamMapping::new(topic, key)])).unwrap_err()
        };
        assert!(bad("a.{x", "k").contains("streams[0].topic"));
        assert!(bad("a.b{x}", "k").contains("whole token"));
        assert!(bad("a.{x}.{x}", "k").contains("twice"));
        assert!(bad("a.{x}", "k-{y}").contains("{y} is not a {field} of the topic"));
        assert!(bad("a.{x}.{y}", "k-{x}{y}").contains("no text between"));
        assert!(bad("a.{x}", "").contains("streams[0].key"));
        assert!(bad("a.{payload}", "k").contains("payload"));
        assert!(Layout::new(&LayoutOptions::new(vec![]))
            .unwrap_err()
            .contains("streams is empty"));
        let mut o = LayoutOptions::new(vec![StreamMapping::new("a.{t}", "k")]);
        o.headers.insert("source".into(), "t".into());
        assert!(Layout::new(&o).unwrap_err().contains("headers.source"));
    }

    #[test]
    fn times_parse_exactly_in_each_unit() {
        assert_eq!(parse_time("1.5", TimestampUnit::S), Some(1_500_000));
        assert_eq!(
            parse_time("1700000000", TimestampUnit::S),
            Some(1_700_000_000_000_000)
        );
        assert_eq!(parse_time("2.25", TimestampUnit::Ms), Some(2_250));
        assert_eq!(
            parse_time("1.7e9", TimestampUnit::S),
            Some(1_700_000_000_000_000)
        );
        assert_eq!(parse_time("-1", TimestampUnit::S), None);
        assert_eq!(parse_time("x", TimestampUnit::Us), None);
        assert_eq!(format_time(1_500_000, TimestampUnit::S), "1.500000");
    }
}
