//! NATS subjects for busway topics, without a copy per publish.
//!
//! A [`Topic`] is an `Arc<str>`; an async-nats [`Subject`] is a `Bytes`. Making one from the
//! other copies the topic into a new buffer, and async-nats then turns that buffer into a
//! shared one on its first clone: two allocations and two frees per publish. Publishers send
//! the same few topics over and over from the same threads, so each thread keeps the subjects
//! of the topics it sent last, and a repeated topic costs a reference-count increment.

use std::cell::RefCell;

use async_nats::Subject;
use busway::Topic;

use busway::transport::is_inbox;

/// Entries per thread (a power of two). A slot is picked by the topic's address, so the
/// topics a thread sends in turn rarely evict one another.
const SLOTS: usize = 16;

thread_local! {
    /// Per thread: topic -> its subject. The cached `Topic` keeps its buffer alive, so a topic
    /// whose text sits at the same address with the same length is the same topic.
    static SUBJECTS: RefCell<[Option<(Topic, Subject)>; SLOTS]> = const {
        RefCell::new([const { None }; SLOTS])
    };
}

/// The NATS subject of `topic`. Request inboxes (each used once, by one reply) are copied,
/// not cached: they would only push the repeated topics out.
pub(crate) fn of(topic: &Topic) -> Subject {
    let text = topic.as_str();
    if is_inbox(text) {
        return Subject::from(text);
    }
    // Bits below 4 are the same for every heap block; the next ones pick the slot.
    let slot = (text.as_ptr() as usize >> 4) & (SLOTS - 1);
    SUBJECTS
        .try_with(|cache| {
            let mut cache = cache.borrow_mut();
            let entry = &mut cache[slot];
            match entry {
                Some((cached, subject))
                    if std::ptr::eq(cached.as_str(), text) || cached.as_str() == text =>
                {
                    subject.clone()
                }
                _ => {
                    let subject = Subject::from(text);
                    // The clone in the cache makes the subject's buffer shared now, once,
                    // instead of on async-nats's clone of every publish.
                    *entry = Some((topic.clone(), subject.clone()));
                    subject
                }
            }
        })
        // The thread is exiting (its cache is gone): copy.
        .unwrap_or_else(|_| Subject::from(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_their_topics_through_hits_and_evictions() {
        let topics: Vec<Topic> = (0..4 * SLOTS)
            .map(|i| Topic::new(format!("a.b.{i}")).unwrap())
            .collect();
        for _ in 0..3 {
            for t in &topics {
                assert_eq!(of(t).as_str(), t.as_str());
            }
        }
        // An equal topic in another buffer finds the same text.
        let again = Topic::new("a.b.0").unwrap();
        assert_eq!(of(&again).as_str(), "a.b.0");
        let inbox = Topic::new("_INBOX.abc.1").unwrap();
        assert_eq!(of(&inbox).as_str(), "_INBOX.abc.1");
    }
}
