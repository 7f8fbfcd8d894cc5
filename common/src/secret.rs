//! Secret handling shared by both programs: random tokens and constant-time comparison.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64URL, Engine};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

/// A fresh random secret of `bytes` bytes, URL-safe base64 without padding.
pub fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buf)
        .expect("system RNG failed");
    B64URL.encode(buf)
}

/// Compares two secrets in constant time with respect to their contents and lengths: both are
/// hashed first, so the comparison always runs over 32 bytes.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let ha = Sha256::digest(a);
    let hb = Sha256::digest(b);
    let mut diff = 0u8;
    for (x, y) in ha.iter().zip(hb.iter()) {
        diff |= x ^ y;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_compare() {
        let a = random_token(32);
        let b = random_token(32);
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(ct_eq(a.as_bytes(), a.clone().as_bytes()));
        assert!(!ct_eq(a.as_bytes(), b.as_bytes()));
        assert!(!ct_eq(a.as_bytes(), &a.as_bytes()[1..]));
    }
}
