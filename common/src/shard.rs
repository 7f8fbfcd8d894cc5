//! Which master a node's workers join when the controller runs several (shards).
//!
//! Rendezvous (highest random weight) hashing: every node scores every shard with a hash of
//! (node id, shard index) and takes the highest. The choice depends only on the node's id and
//! the number of shards, so every agent decides alone, the same way after a restart, and:
//!
//! - adding shard K moves only the nodes whose score for K beats their best so far, about
//!   1/(K+1) of them, and all of them to K; removing the last shard moves only its nodes;
//! - a shard that crashes and is restarted in place (same index) moves nobody.

use sha2::{Digest, Sha256};

/// The score of `shard` for `node_id`: the first 8 bytes of SHA-256 over both.
pub fn weight(node_id: &str, shard: u32) -> u64 {
    let mut h = Sha256::new();
    h.update(node_id.as_bytes());
    h.update([0]);
    h.update(shard.to_be_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The shard (0 to `shards` - 1) a node's workers join; 0 when there is one or none.
pub fn pick(node_id: &str, shards: usize) -> usize {
    let shards = u32::try_from(shards).unwrap_or(u32::MAX);
    (0..shards)
        .max_by_key(|s| (weight(node_id, *s), std::cmp::Reverse(*s)))
        .unwrap_or(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("i-{i:017x}")).collect()
    }

    #[test]
    fn one_master_or_none_is_shard_zero_and_the_choice_is_stable() {
        assert_eq!(pick("a", 0), 0);
        assert_eq!(pick("a", 1), 0);
        let first: Vec<usize> = nodes(50).iter().map(|n| pick(n, 4)).collect();
        let again: Vec<usize> = nodes(50).iter().map(|n| pick(n, 4)).collect();
        assert_eq!(first, again);
        assert!(first.iter().all(|s| *s < 4));
    }

    #[test]
    fn nodes_spread_evenly_over_the_shards() {
        let mut per = [0usize; 3];
        for n in nodes(3000) {
            per[pick(&n, 3)] += 1;
        }
        // 1000 each expected; a binomial's 4 standard deviations are about 100.
        assert!(per.iter().all(|c| (900..=1100).contains(c)), "{per:?}");
    }

    #[test]
    fn a_new_shard_takes_about_its_share_and_moves_nobody_else() {
        let all = nodes(3000);
        for k in 1..6 {
            let moved: Vec<&String> = all
                .iter()
                .filter(|n| pick(n, k) != pick(n, k + 1))
                .collect();
            assert!(
                moved.iter().all(|n| pick(n, k + 1) == k),
                "moves go to the new shard"
            );
            let share = moved.len() as f64 / all.len() as f64;
            let want = 1.0 / (k + 1) as f64;
            assert!(
                (share - want).abs() < 0.04,
                "{k} -> {}: {share} moved",
                k + 1
            );
        }
    }

    #[test]
    fn scaling_100_to_150_nodes_with_2_to_3_shards_moves_only_what_shard_2_takes() {
        let before = nodes(100);
        let after = nodes(150);
        let moved: Vec<&String> = before.iter().filter(|n| pick(n, 2) != pick(n, 3)).collect();
        // Every moved node went to the new shard; the others kept theirs.
        assert!(moved.iter().all(|n| pick(n, 3) == 2));
        assert!(
            (20..=47).contains(&moved.len()),
            "{} of 100 moved",
            moved.len()
        );
        // The 50 new nodes spread over all three, the new shard included.
        let new_on: Vec<usize> = after[100..].iter().map(|n| pick(n, 3)).collect();
        for s in 0..3 {
            assert!(new_on.contains(&s), "shard {s} got none of the new nodes");
        }
    }

    #[test]
    fn removing_the_last_shard_moves_only_its_nodes() {
        for n in nodes(500) {
            if pick(&n, 3) != 2 {
                assert_eq!(pick(&n, 2), pick(&n, 3), "{n}");
            }
        }
    }
}
