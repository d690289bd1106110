//! The Redis broadcast frame decoder on arbitrary bytes (what a foreign publisher can send).
//!
//! Invariants: decoding never panics or over-reads; a frame that decodes re-encodes to a
//! frame that decodes to the same message (the decoder accepts nothing the encoder cannot
//! represent), and re-encoding that is stable byte for byte.
#![no_main]

use busway::Topic;
use busway_redis::wire::{decode, encode};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let topic = Topic::new("fuzz.frame").expect("valid topic");
    let Ok(message) = decode(topic.clone(), Bytes::copy_from_slice(data)) else {
        return;
    };
    let again = encode(&message);
    let round = decode(topic, Bytes::from(again.clone())).expect("a re-encoded frame decodes");
    assert_eq!(round, message, "decode(encode(m)) != m");
    assert_eq!(encode(&round), again, "encoding is not stable");
});
