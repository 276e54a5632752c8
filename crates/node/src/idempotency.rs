//! Idempotency keys for admin writes: a write sent again with the same `Idempotency-Key` gets the
//! first write's answer and applies nothing new, so a client may retry a write whose answer it
//! never saw (a timeout, a dropped connection) without flipping a toggle back.
//!
//! Keys are kept per node in memory, scoped to the token and the flag set, for the last
//! [`MAX_KEYS`] keyed writes: a retry must reach the same node within that window (an admin client
//! that retries pins a node, as read-your-writes already asks).

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

/// Longest idempotency key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// Keyed writes remembered per node; the oldest is forgotten first.
pub const MAX_KEYS: usize = 10_000;

/// Who may see a key's answer: the same token, on the same flag set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyScope {
    pub token_id: String,
    pub flag_set: String,
    pub key: String,
}

/// Where a keyed write stands.
#[derive(Debug)]
pub enum Entry<R, W> {
    /// Applied, waiting to be stored; retries wait with it.
    InProgress { fingerprint: u64, waiters: Vec<W> },
    /// Answered; retries get this answer.
    Done { fingerprint: u64, answer: R },
}

/// What to do with a write that carries a key.
#[derive(Debug, PartialEq)]
pub enum Lookup<R> {
    /// First time: apply it.
    New,
    /// Answered before: send this answer.
    Answered(R),
    /// The first write is still being stored: the waiter was queued.
    Joined,
    /// The key was used for a different write.
    Mismatch,
}

/// The remembered keys, oldest first.
#[derive(Debug)]
pub struct Index<R, W> {
    entries: HashMap<KeyScope, Entry<R, W>>,
    order: VecDeque<KeyScope>,
}

impl<R, W> Default for Index<R, W> {
    fn default() -> Self {
        Index {
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

/// A fingerprint of a write's content, to tell a retry from a different write under the same key.
pub fn fingerprint(write: &impl std::fmt::Debug) -> u64 {
    let mut h = DefaultHasher::new();
    format!("{write:?}").hash(&mut h);
    h.finish()
}

impl<R: Clone, W> Index<R, W> {
    /// Looks a key up; a retry of a write still in progress leaves `waiter` with it.
    pub fn lookup(
        &mut self,
        scope: &KeyScope,
        fingerprint: u64,
        waiter: W,
    ) -> (Lookup<R>, Option<W>) {
        match self.entries.get_mut(scope) {
            None => (Lookup::New, Some(waiter)),
            Some(Entry::Done { fingerprint: f, .. } | Entry::InProgress { fingerprint: f, .. })
                if *f != fingerprint =>
            {
                (Lookup::Mismatch, Some(waiter))
            }
            Some(Entry::Done { answer, .. }) => (Lookup::Answered(answer.clone()), Some(waiter)),
            Some(Entry::InProgress { waiters, .. }) => {
                waiters.push(waiter);
                (Lookup::Joined, None)
            }
        }
    }

    /// Marks a key as applied and waiting to be stored.
    pub fn start(&mut self, scope: KeyScope, fingerprint: u64) {
        self.remember(
            scope,
            Entry::InProgress {
                fingerprint,
                waiters: Vec::new(),
            },
        );
    }

    /// Records a key's answer; returns the retries that waited for it.
    pub fn finish(&mut self, scope: &KeyScope, fingerprint: u64, answer: R) -> Vec<W> {
        let waiters = match self.entries.remove(scope) {
            Some(Entry::InProgress { waiters, .. }) => waiters,
            _ => Vec::new(),
        };
        self.remember(
            scope.clone(),
            Entry::Done {
                fingerprint,
                answer,
            },
        );
        waiters
    }

    fn remember(&mut self, scope: KeyScope, entry: Entry<R, W>) {
        if self.entries.insert(scope.clone(), entry).is_none() {
            self.order.push_back(scope);
        }
        while self.order.len() > MAX_KEYS {
            if let Some(old) = self.order.pop_front() {
                // A write still in progress is never forgotten before its answer.
                if matches!(self.entries.get(&old), Some(Entry::InProgress { .. })) {
                    self.order.push_back(old);
                    break;
                }
                self.entries.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(key: &str) -> KeyScope {
        KeyScope {
            token_id: "t".into(),
            flag_set: "default".into(),
            key: key.into(),
        }
    }

    #[test]
    fn a_retry_gets_the_first_answer_and_a_different_write_is_a_mismatch() {
        let mut index: Index<u32, &str> = Index::default();
        assert_eq!(index.lookup(&scope("k"), 1, "first").0, Lookup::New);
        index.start(scope("k"), 1);
        assert_eq!(index.lookup(&scope("k"), 1, "retry").0, Lookup::Joined);
        assert_eq!(index.lookup(&scope("k"), 2, "other").0, Lookup::Mismatch);
        assert_eq!(index.finish(&scope("k"), 1, 200), vec!["retry"]);
        assert_eq!(
            index.lookup(&scope("k"), 1, "late").0,
            Lookup::Answered(200)
        );
        assert_eq!(index.lookup(&scope("k"), 2, "other").0, Lookup::Mismatch);
    }

    #[test]
    fn the_oldest_answers_are_forgotten_past_the_limit() {
        let mut index: Index<u32, ()> = Index::default();
        for i in 0..=MAX_KEYS {
            let s = scope(&i.to_string());
            index.start(s.clone(), 0);
            let _ = index.finish(&s, 0, 1);
        }
        assert_eq!(index.lookup(&scope("0"), 0, ()).0, Lookup::New);
        assert_eq!(
            index.lookup(&scope(&MAX_KEYS.to_string()), 0, ()).0,
            Lookup::Answered(1)
        );
    }
}
