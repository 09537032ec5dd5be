//! Text keys (RFC 7143 6.1): `key=value\0` pairs in Login and Text data.
//!
//! Limits enforced here, whatever the peer sends: a key is at most 63 bytes
//! of `[A-Za-z0-9.\-+@_]`, a value at most 255 bytes except for the few keys
//! that carry long binary values (CHAP challenges and responses, up to
//! [`MAX_TEXT`]), and a whole request after joining Continue PDUs at most
//! [`MAX_TEXT`] bytes.

use bytes::{BufMut, Bytes, BytesMut};

/// Largest text a request may accumulate across Continue PDUs.
pub const MAX_TEXT: usize = 8192;
pub const MAX_KEY: usize = 63;
pub const MAX_VALUE: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("text of {0} bytes exceeds {MAX_TEXT}")]
    TooLong(usize),
    #[error("a pair without '='")]
    NoEquals,
    #[error("invalid key")]
    BadKey,
    #[error("value of key {0} too long")]
    ValueTooLong(String),
    #[error("value is not UTF-8")]
    NotUtf8,
}

/// Keys whose values may exceed 255 bytes (binary CHAP values as hex/base64).
fn long_value_key(k: &str) -> bool {
    matches!(k, "CHAP_C" | "CHAP_R" | "TargetAddress" | "SendTargets")
        || k.starts_with("X-")
        || k.starts_with("X#")
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= MAX_KEY
        && k.bytes().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+' | b'@' | b'_' | b'#')
        })
}

/// Ordered key/value pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextPairs(pub Vec<(String, String)>);

impl TextPairs {
    pub fn new() -> Self {
        TextPairs(Vec::new())
    }
    pub fn parse(data: &[u8]) -> Result<TextPairs, TextError> {
        if data.len() > MAX_TEXT {
            return Err(TextError::TooLong(data.len()));
        }
        let mut out = Vec::new();
        for item in data.split(|&b| b == 0) {
            // Trailing NULs (and padding some initiators leave) make empty items.
            if item.is_empty() {
                continue;
            }
            let eq = item
                .iter()
                .position(|&b| b == b'=')
                .ok_or(TextError::NoEquals)?;
            let key = std::str::from_utf8(&item[..eq]).map_err(|_| TextError::NotUtf8)?;
            let value = std::str::from_utf8(&item[eq + 1..]).map_err(|_| TextError::NotUtf8)?;
            if !valid_key(key) {
                return Err(TextError::BadKey);
            }
            if value.len() > MAX_VALUE && !long_value_key(key) {
                return Err(TextError::ValueTooLong(key.to_string()));
            }
            out.push((key.to_string(), value.to_string()));
        }
        Ok(TextPairs(out))
    }
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.push((key.into(), value.into()));
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        for (k, v) in &self.0 {
            b.put_slice(k.as_bytes());
            b.put_u8(b'=');
            b.put_slice(v.as_bytes());
            b.put_u8(0);
        }
        b.freeze()
    }
}

/// Joins the data of PDUs sent with the Continue bit, bounded by [`MAX_TEXT`].
#[derive(Debug, Default)]
pub struct TextAccumulator {
    buf: BytesMut,
}

impl TextAccumulator {
    pub fn push(&mut self, data: &[u8]) -> Result<(), TextError> {
        if self.buf.len() + data.len() > MAX_TEXT {
            return Err(TextError::TooLong(self.buf.len() + data.len()));
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }
    pub fn take(&mut self) -> BytesMut {
        std::mem::take(&mut self.buf)
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Parses a numeric value: decimal, or hex with a 0x prefix (RFC 7143 6.1).
pub fn parse_number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || h.len() > 16 {
            return None;
        }
        u64::from_str_radix(h, 16).ok()
    } else {
        if v.is_empty() || v.len() > 20 || !v.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        v.parse().ok()
    }
}

/// Decodes a binary value: `0x`/`0X` hex or `0b`/`0B` base64 (RFC 7143 6.1).
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        let h = h.as_bytes();
        // An odd number of digits has an implicit leading zero.
        let mut out = Vec::with_capacity(h.len() / 2 + 1);
        let mut i = 0;
        if h.len() % 2 == 1 {
            out.push(hexval(h[0])?);
            i = 1;
        }
        while i < h.len() {
            out.push(hexval(h[i])? << 4 | hexval(*h.get(i + 1)?)?);
            i += 2;
        }
        if out.is_empty() {
            return None;
        }
        Some(out)
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        base64_decode(b)
    } else {
        None
    }
}

fn hexval(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

pub fn encode_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = acc << 6 | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if out.is_empty() {
        None
    } else {
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_encode() {
        let t = TextPairs::parse(b"InitiatorName=iqn.x\0SessionType=Normal\0\0").unwrap();
        assert_eq!(t.get("SessionType"), Some("Normal"));
        assert_eq!(TextPairs::parse(&t.encode()).unwrap(), t);
        assert_eq!(TextPairs::parse(b"novalue\0"), Err(TextError::NoEquals));
        let long = format!("{}=1\0", "K".repeat(64));
        assert_eq!(TextPairs::parse(long.as_bytes()), Err(TextError::BadKey));
        let v = format!("MaxBurstLength={}\0", "1".repeat(256));
        assert!(matches!(
            TextPairs::parse(v.as_bytes()),
            Err(TextError::ValueTooLong(_))
        ));
    }

    #[test]
    fn numbers_and_binary() {
        assert_eq!(parse_number("8192"), Some(8192));
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(decode_binary("0x0aff"), Some(vec![10, 255]));
        assert_eq!(decode_binary("0xaff"), Some(vec![10, 255]));
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("12"), None);
        assert_eq!(encode_hex(&[1, 0xab]), "0x01ab");
    }
}
