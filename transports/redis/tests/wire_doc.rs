//! docs/WIRE.md is a contract: every `wire-example` block in it is decoded here with the
//! crate's own decoder and checked field by field, and encoding the decoded message gives
//! the same bytes back.

use busway::Topic;
use busway_redis::wire;
use bytes::Bytes;

struct Example {
    fields: Vec<(String, String)>,
}

impl Example {
    fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn examples() -> Vec<Example> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/WIRE.md"))
        .expect("docs/WIRE.md");
    let mut out = Vec::new();
    let mut current: Option<Example> = None;
    for line in doc.lines() {
        match (&mut current, line.trim()) {
            (None, "```wire-example") => current = Some(Example { fields: Vec::new() }),
            (Some(_), "```") => out.push(current.take().unwrap()),
            (Some(ex), l) => {
                let (k, v) = l.split_once(": ").expect("key: value");
                ex.fields.push((k.to_string(), v.to_string()));
            }
            _ => {}
        }
    }
    out
}

#[test]
fn every_documented_frame_decodes_to_its_documented_fields() {
    let examples = examples();
    assert!(examples.len() >= 3, "the doc's examples were not found");
    for ex in &examples {
        let channel = ex.get("channel").expect("channel");
        let bytes: Vec<u8> = ex
            .get("hex")
            .expect("hex")
            .split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
            .collect();
        let m = wire::decode(Topic::new(channel).unwrap(), Bytes::from(bytes.clone()))
            .unwrap_or_else(|e| panic!("{channel}: {e}"));
        let h = &m.headers;
        assert_eq!(
            &m.payload[..],
            ex.get("payload").unwrap().as_bytes(),
            "{channel}"
        );
        assert_eq!(h.id.as_deref(), ex.get("id"), "{channel}");
        assert_eq!(
            h.timestamp_us,
            ex.get("timestamp_us").map(|t| t.parse().unwrap()),
            "{channel}"
        );
        assert_eq!(h.source.as_deref(), ex.get("source"), "{channel}");
        assert_eq!(
            h.content_type.as_deref(),
            ex.get("content_type"),
            "{channel}"
        );
        assert_eq!(
            h.reply_to.as_ref().map(|t| t.as_str()),
            ex.get("reply_to"),
            "{channel}"
        );
        assert_eq!(
            h.correlation_id.as_deref(),
            ex.get("correlation_id"),
            "{channel}"
        );
        let extra: Vec<(String, String)> = ex
            .fields
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("extra.")?.to_string(), v.clone())))
            .collect();
        assert_eq!(h.extra, extra, "{channel}");
        assert_eq!(
            wire::encode(&m),
            bytes,
            "{channel}: encoding gives the bytes back"
        );
    }
}
