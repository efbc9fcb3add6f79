//! The verified-token cache (Envoy's `jwt_cache_config`): a token that verified once is not
//! verified again until it expires. Bounded, least recently used out first.

use std::collections::HashMap;

use crate::jwt::check_time;

/// Tokens longer than this are not cached (Envoy's limit).
pub const MAX_CACHED_TOKEN_BYTES: usize = 4 * 1024;

/// What a verified token produced, kept so a repeated token needs no parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// `exp` in Unix seconds, if the token has one.
    pub exp: Option<u64>,
    /// `nbf` in Unix seconds, if the token has one.
    pub nbf: Option<u64>,
    /// The `claim_to_headers` output: (header name, value).
    pub claim_headers: Vec<(String, String)>,
}

struct Entry {
    verified: Verified,
    last_used: u64,
}

/// Verified tokens of one provider, at most `capacity` of them.
pub struct TokenCache {
    capacity: usize,
    entries: HashMap<String, Entry>,
    clock: u64,
}

impl TokenCache {
    /// A cache holding at most `capacity` tokens; 0 disables it.
    pub fn new(capacity: usize) -> TokenCache {
        TokenCache {
            capacity,
            entries: HashMap::new(),
            clock: 0,
        }
    }

    /// The entry for `token` if it is still valid at `now` (Unix seconds, `skew` allowed).
    /// An expired entry is dropped.
    pub fn get(&mut self, token: &str, now: u64, skew: u64) -> Option<&Verified> {
        self.clock += 1;
        let clock = self.clock;
        let valid = {
            let entry = self.entries.get_mut(token)?;
            entry.last_used = clock;
            check_time(entry.verified.exp, entry.verified.nbf, now, skew).is_ok()
        };
        if !valid {
            self.entries.remove(token);
            return None;
        }
        self.entries.get(token).map(|e| &e.verified)
    }

    /// Remember that `token` verified. When full, expired entries go first, then the least
    /// recently used one.
    pub fn insert(&mut self, token: &str, verified: Verified, now: u64, skew: u64) {
        if self.capacity == 0 || token.len() > MAX_CACHED_TOKEN_BYTES {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(token) {
            self.entries
                .retain(|_, e| check_time(e.verified.exp, None, now, skew).is_ok());
            if self.entries.len() >= self.capacity
                && let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        self.clock += 1;
        self.entries.insert(
            token.to_string(),
            Entry {
                verified,
                last_used: self.clock,
            },
        );
    }

    /// Forget every token (the keys changed).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The number of cached tokens.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(exp: Option<u64>) -> Verified {
        Verified {
            exp,
            nbf: None,
            claim_headers: vec![("x-sub".into(), "alice".into())],
        }
    }

    #[test]
    fn hit_until_exp_plus_skew_then_dropped() {
        let mut c = TokenCache::new(10);
        c.insert("t", v(Some(1000)), 900, 60);
        assert_eq!(c.get("t", 1000, 60), Some(&v(Some(1000))));
        assert!(c.get("t", 1060, 60).is_some(), "within the skew");
        assert!(c.get("t", 1061, 60).is_none());
        assert!(c.is_empty(), "the expired entry is dropped");
        assert!(c.get("other", 0, 0).is_none());
    }

    #[test]
    fn bounded_expired_first_then_least_recently_used() {
        let mut c = TokenCache::new(2);
        c.insert("a", v(None), 0, 0);
        c.insert("b", v(Some(10)), 0, 0);
        // "b" has expired by now: it goes, "a" stays.
        c.insert("c", v(None), 100, 0);
        assert_eq!(c.len(), 2);
        assert!(c.get("a", 100, 0).is_some());
        assert!(c.get("c", 100, 0).is_some());
        // Use "a" again: "c" is now the least recently used.
        assert!(c.get("a", 100, 0).is_some());
        c.insert("d", v(None), 100, 0);
        assert!(c.get("c", 100, 0).is_none());
        assert!(c.get("a", 100, 0).is_some());
        assert!(c.get("d", 100, 0).is_some());
        // Re-inserting a present token evicts nothing.
        c.insert("d", v(None), 100, 0);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn disabled_or_too_long_tokens_are_not_cached() {
        let mut c = TokenCache::new(0);
        c.insert("a", v(None), 0, 0);
        assert!(c.is_empty());
        let mut c = TokenCache::new(5);
        c.insert(&"x".repeat(MAX_CACHED_TOKEN_BYTES + 1), v(None), 0, 0);
        assert!(c.is_empty());
        c.insert("a", v(None), 0, 0);
        c.clear();
        assert!(c.is_empty());
    }
}
