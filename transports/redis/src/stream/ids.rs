//! [`StreamId`]: a stream entry id, ordered and stepped as Redis does.

use std::fmt;

/// A stream entry id (`ms-seq`), ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(super) struct StreamId {
    ms: u64,
    seq: u64,
}

impl StreamId {
    /// Before every entry.
    pub(super) const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    pub(super) fn parse(s: &str) -> Option<StreamId> {
        let (ms, seq) = s.split_once('-')?;
        Some(StreamId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// The smallest id after this one (an inclusive `XRANGE` start that excludes it).
    pub(super) fn next(self) -> StreamId {
        match self.seq.checked_add(1) {
            Some(seq) => StreamId { ms: self.ms, seq },
            None => StreamId {
                ms: self.ms.saturating_add(1),
                seq: 0,
            },
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_and_step_like_redis() {
        let a = StreamId::parse("1700000000000-5").unwrap();
        let b = StreamId::parse("1700000000001-0").unwrap();
        assert!(StreamId::ZERO < a && a < b);
        assert_eq!(a.next().to_string(), "1700000000000-6");
        assert_eq!(
            StreamId::parse(&format!("7-{}", u64::MAX))
                .unwrap()
                .next()
                .to_string(),
            "8-0"
        );
        assert!(StreamId::parse("12").is_none());
        assert!(StreamId::parse("a-1").is_none());
    }
}
