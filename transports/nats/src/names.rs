//! Topics <-> NATS subjects, without a copy per message.
//!
//! Publishing:
//! A [`Topic`] is an `Arc<str>`; an async-nats [`Subject`] is a `Bytes`. Making one from the
//! other copies the topic into a new buffer, and async-nats then turns that buffer into a
//! shared one on its first clone: two allocations and two frees per publish. Publishers send
//! the same few topics over and over from the same threads, so each thread keeps the subjects
//! of the topics it sent last, and a repeated topic costs a reference-count increment.
//!
//! Receiving: [`SubjectTopics`] keeps the last topic of a subscription, so a repeated subject
//! is not parsed again.

use std::cell::RefCell;

use async_nats::Subject;
use busway::{Pattern, Result, Topic};

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
pub(crate) fn subject_of(topic: &Topic) -> Subject {
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
                    // The clone in the cache makes the subject's buffer shared here, once, so
                    // async-nats's clone on every publish is a reference-count increment.
                    *entry = Some((topic.clone(), subject.clone()));
                    subject
                }
            }
        })
        // The thread is exiting (its cache is gone): copy.
        .unwrap_or_else(|_| Subject::from(text))
}

/// The topics of one subscription's subjects. Subjects repeat (an exact subscription sees
/// one; a wildcard one often the same few), so the last topic is kept and a matching subject
/// reuses it: no parse, no allocation.
#[derive(Debug, Clone)]
pub(crate) struct SubjectTopics {
    last: Topic,
}

impl SubjectTopics {
    pub(crate) fn new(pattern: &Pattern) -> SubjectTopics {
        // Any valid topic will do until the first message: a subject never equals it by
        // chance in a way that matters (equal strings are the same topic).
        let last = pattern
            .as_topic()
            .unwrap_or_else(|| Topic::new("_").expect("\"_\" is a valid topic"));
        SubjectTopics { last }
    }

    /// The topic named by `subject`.
    ///
    /// # Errors
    /// When the subject is not a valid busway topic (a foreign publisher's).
    pub(crate) fn topic(&mut self, subject: &str) -> Result<Topic> {
        if subject == self.last.as_str() {
            Ok(self.last.clone())
        } else {
            Topic::new(subject).inspect(|t| self.last = t.clone())
        }
    }
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
                assert_eq!(subject_of(t).as_str(), t.as_str());
            }
        }
        // An equal topic in another buffer finds the same text.
        let again = Topic::new("a.b.0").unwrap();
        assert_eq!(subject_of(&again).as_str(), "a.b.0");
        let inbox = Topic::new("_INBOX.abc.1").unwrap();
        assert_eq!(subject_of(&inbox).as_str(), "_INBOX.abc.1");
    }
}
