//! Load balancing: picking an endpoint among the available ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::endpoint::Endpoint;

/// Load-balancing policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Each endpoint in turn (weighted by repetition).
    RoundRobin,
    /// The less loaded of two random endpoints (power of two choices).
    LeastRequest,
    /// Uniformly random (weighted).
    Random,
    /// Consistent hashing on a request key (ring hash, Envoy's `RING_HASH`).
    RingHash(HashOn),
}

/// What ring hash hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// A request header's value.
    Header(http::HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// The client's IP address.
    SourceIp,
}

/// Per-cluster balancer state.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    next: AtomicUsize,
}

/// Points per unit of weight on the hash ring.
const RING_POINTS_PER_WEIGHT: u32 = 64;

/// A consistent-hash ring over a set of endpoints (indices into the set).
#[derive(Debug, Default)]
pub struct Ring {
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// Build over `endpoints`, each with `weight × 64` points.
    pub fn new(endpoints: &[Arc<Endpoint>]) -> Ring {
        let mut points = Vec::new();
        for (i, ep) in endpoints.iter().enumerate() {
            for n in 0..ep.weight.max(1) * RING_POINTS_PER_WEIGHT {
                points.push((hash_bytes(format!("{}#{n}", ep.key).as_bytes()), i));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// The endpoint index owning `hash`, walking on past indices that `skip` rejects.
    pub fn lookup(&self, hash: u64, skip: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|p| p.0 < hash);
        (0..self.points.len())
            .map(|k| self.points[(start + k) % self.points.len()].1)
            .find(|&i| !skip(i))
    }
}

/// 64-bit FNV-1a followed by a murmur finalizer: stable across processes and releases.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

impl Balancer {
    /// A balancer with `policy`.
    pub fn new(policy: Policy) -> Balancer {
        Balancer {
            policy,
            next: AtomicUsize::new(0),
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Pick among `candidates` (non-empty, already filtered to available endpoints).
    /// `hash` is the request's hash key for ring hash; `ring` the ring over `candidates`.
    pub fn pick(&self, candidates: &[Arc<Endpoint>], random: u64) -> usize {
        let n = candidates.len();
        if n == 1 {
            return 0;
        }
        match &self.policy {
            Policy::RoundRobin => {
                let total: usize = candidates.iter().map(|e| e.weight as usize).sum();
                let mut slot = self.next.fetch_add(1, Ordering::Relaxed) % total.max(1);
                for (i, ep) in candidates.iter().enumerate() {
                    if slot < ep.weight as usize {
                        return i;
                    }
                    slot -= ep.weight as usize;
                }
                0
            }
            Policy::Random => weighted_random(candidates, random),
            Policy::LeastRequest => {
                let a = (random % n as u64) as usize;
                let mut b = ((random >> 32) % (n as u64 - 1)) as usize;
                if b >= a {
                    b += 1;
                }
                let la = candidates[a].active_requests() as u64 * 1000
                    / u64::from(candidates[a].weight.max(1));
                let lb = candidates[b].active_requests() as u64 * 1000
                    / u64::from(candidates[b].weight.max(1));
                if lb < la { b } else { a }
            }
            // Ring hash is resolved by the cluster with its ring; without a key it is random.
            Policy::RingHash(_) => weighted_random(candidates, random),
        }
    }
}

fn weighted_random(candidates: &[Arc<Endpoint>], random: u64) -> usize {
    let total: u64 = candidates.iter().map(|e| u64::from(e.weight)).sum();
    let mut point = random % total.max(1);
    for (i, ep) in candidates.iter().enumerate() {
        if point < u64::from(ep.weight) {
            return i;
        }
        point -= u64::from(ep.weight);
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn eps(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                Arc::new(Endpoint::new(
                    format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
                    format!("e{i}"),
                    1,
                    BTreeMap::new(),
                ))
            })
            .collect()
    }

    #[test]
    fn round_robin_cycles() {
        let e = eps(3);
        let b = Balancer::new(Policy::RoundRobin);
        let picks: Vec<usize> = (0..6).map(|_| b.pick(&e, 0)).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_request_prefers_idle() {
        let e = eps(2);
        let _guard = e[0].start_request();
        let b = Balancer::new(Policy::LeastRequest);
        for r in 0..50u64 {
            assert_eq!(b.pick(&e, r.wrapping_mul(0x9e37_79b9_7f4a_7c15)), 1);
        }
    }

    #[test]
    fn ring_is_consistent_and_spreads() {
        let e = eps(4);
        let ring = Ring::new(&e);
        let mut counts = [0; 4];
        for k in 0..4000u32 {
            let h = hash_bytes(&k.to_le_bytes());
            let i = ring.lookup(h, |_| false).unwrap();
            assert_eq!(ring.lookup(h, |_| false), Some(i));
            counts[i] += 1;
        }
        assert!(counts.iter().all(|&c| c > 500), "{counts:?}");
        // Skipping an endpoint moves only its keys.
        let h = hash_bytes(b"user-1");
        let owner = ring.lookup(h, |_| false).unwrap();
        let next = ring.lookup(h, |i| i == owner).unwrap();
        assert_ne!(owner, next);
    }
}
