//! CHAP (RFC 1994 as used by RFC 7143 12.1.3): response = H(id || secret ||
//! challenge) with MD5 (CHAP_A=5) or SHA-256 (CHAP_A=7, RFC 7143 + RFC 7144).
//!
//! Invariants: a challenge is fresh random bytes of the digest size; a
//! response is compared in constant time; an initiator challenge equal to the
//! one we sent (a reflection attack) is refused by the login code.

use md5::Md5;
use sha2::{Digest, Sha256};

/// Secrets the target checks an initiator against (and answers with for mutual CHAP).
#[derive(Clone, PartialEq, Eq)]
pub struct ChapSecrets {
    /// CHAP_N the initiator must present.
    pub user: String,
    pub secret: Vec<u8>,
    /// (name, secret) the target presents when the initiator challenges it.
    pub mutual: Option<(String, Vec<u8>)>,
}

impl std::fmt::Debug for ChapSecrets {
    // Secrets never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapSecrets")
            .field("user", &self.user)
            .field("mutual", &self.mutual.as_ref().map(|m| &m.0))
            .finish_non_exhaustive()
    }
}

/// CHAP_A values we implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChapAlgorithm {
    Md5,
    Sha256,
}

impl ChapAlgorithm {
    pub fn from_code(c: &str) -> Option<ChapAlgorithm> {
        match c.trim() {
            "5" => Some(ChapAlgorithm::Md5),
            "7" => Some(ChapAlgorithm::Sha256),
            _ => None,
        }
    }
    pub fn code(self) -> &'static str {
        match self {
            ChapAlgorithm::Md5 => "5",
            ChapAlgorithm::Sha256 => "7",
        }
    }
    pub fn digest_len(self) -> usize {
        match self {
            ChapAlgorithm::Md5 => 16,
            ChapAlgorithm::Sha256 => 32,
        }
    }
    pub fn response(self, id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
        match self {
            ChapAlgorithm::Md5 => {
                let mut h = Md5::new();
                h.update([id]);
                h.update(secret);
                h.update(challenge);
                h.finalize().to_vec()
            }
            ChapAlgorithm::Sha256 => {
                let mut h = Sha256::new();
                h.update([id]);
                h.update(secret);
                h.update(challenge);
                h.finalize().to_vec()
            }
        }
    }
}

/// Equality without an early exit, so timing tells nothing about the secret.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_known_answer() {
        // RFC 1994 style: MD5(0x01 || "secret" || 16 zero bytes).
        let r = ChapAlgorithm::Md5.response(1, b"secret", &[0u8; 16]);
        let mut h = Md5::new();
        h.update([1u8]);
        h.update(b"secret");
        h.update([0u8; 16]);
        assert_eq!(r, h.finalize().to_vec());
        assert_eq!(r.len(), 16);
        assert_eq!(ChapAlgorithm::Sha256.response(1, b"s", b"c").len(), 32);
        assert!(constant_time_eq(b"ab", b"ab"));
        assert!(!constant_time_eq(b"ab", b"ac"));
    }
}
