//! Topic and pattern parsing on arbitrary text, and the matching / overlap invariants.
//!
//! The input is split on `\n` into up to three strings: a topic candidate and two pattern
//! candidates (each also tried as the other kind).
#![no_main]

use busway::{Pattern, Topic};
use libfuzzer_sys::fuzz_target;

fn check_topic(s: &str) -> Option<Topic> {
    let t = Topic::new(s).ok()?;
    assert_eq!(t.as_str(), s);
    // Every valid topic is a valid literal pattern that matches exactly it.
    let p = Pattern::new(s).expect("a valid topic is a valid pattern");
    assert!(p.is_literal(), "{s:?} parsed with a wildcard");
    assert!(p.matches(&t), "literal {s:?} does not match its topic");
    assert_eq!(p.as_topic().as_ref(), Some(&t));
    let exact = Pattern::exact(&t);
    assert!(exact.matches(&t) && exact.covers(&p) && p.covers(&exact));
    Some(t)
}

fn check_pattern(s: &str) -> Option<Pattern> {
    let p = Pattern::new(s).ok()?;
    assert_eq!(p.as_str(), s);
    assert_eq!(Pattern::new(p.as_str()).ok().as_ref(), Some(&p), "reparse");
    assert!(p.covers(&p) && p.overlaps(&p), "{s:?} must cover and overlap itself");
    assert_eq!(p.is_literal(), Topic::new(s).is_ok(), "{s:?}: literal iff a topic");
    Some(p)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        // Bytes that are not UTF-8 cannot reach the parsers (they take &str); still make
        // sure the lossy form is handled.
        let lossy = String::from_utf8_lossy(data);
        let _ = Topic::new(lossy.as_ref());
        let _ = Pattern::new(lossy.as_ref());
        return;
    };
    let mut parts = text.splitn(3, '\n');
    let t = parts.next().unwrap_or("");
    let a = parts.next().unwrap_or("");
    let b = parts.next().unwrap_or("");
    let topic = check_topic(t);
    let pa = check_pattern(a);
    let pb = check_pattern(b);
    let _ = check_topic(a);
    let _ = check_topic(b);
    let _ = check_pattern(t);
    if let (Some(pa), Some(pb)) = (&pa, &pb) {
        assert_eq!(pa.overlaps(pb), pb.overlaps(pa), "overlap not symmetric: {pa} {pb}");
        if pa.covers(pb) {
            assert!(pa.overlaps(pb), "{pa} covers {pb} but does not overlap it");
        }
        if pa.covers(pb) && pb.covers(pa) {
            assert_eq!(pa, pb, "{pa} and {pb} cover each other but differ");
        }
        if let Some(t) = &topic {
            if pa.matches(t) && pb.matches(t) {
                assert!(pa.overlaps(pb), "{t} matches {pa} and {pb}, no overlap");
            }
            if pa.covers(pb) && pb.matches(t) {
                assert!(pa.matches(t), "{pa} covers {pb}, {t} matches only {pb}");
            }
        }
    }
});
