//! iSCSI text key=value segments (RFC 7143 §6): parsing, encoding, value
//! syntax (numbers, booleans, lists, binary) and reassembly of text that
//! spans several PDUs via the C (continue) bit.
//!
//! Parsing borrows from the data segment (`&str` slices, no copies) and is
//! strict about what the RFC makes mandatory — NUL termination, key syntax,
//! UTF-8, length limits — because every later stage (negotiation, CHAP,
//! SendTargets) relies on those guarantees. Reassembly is bounded so a peer
//! cannot make us buffer without limit.

use thiserror::Error;

/// Longest key name (RFC 7143 §6.1).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value for ordinary keys (RFC 7143 §6.1).
pub const MAX_VALUE_LEN: usize = 255;
/// Longest value for keys that allow large binary values (CHAP_C/CHAP_R).
pub const MAX_LARGE_VALUE_LEN: usize = 8192;
/// Default bound for reassembled text across C-bit PDUs.
pub const DEFAULT_TEXT_LIMIT: usize = 64 * 1024;

/// Errors in a text segment.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TextError {
    #[error("text segment does not end with a NUL")]
    Unterminated,
    #[error("text is not valid UTF-8")]
    NotUtf8,
    #[error("pair without '=': {0:?}")]
    MissingEquals(String),
    #[error("invalid key name {0:?}")]
    BadKey(String),
    #[error("value of key {0} too long")]
    ValueTooLong(String),
    #[error("reassembled text exceeds {0} bytes")]
    TooLarge(usize),
}

/// Errors in value syntax.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValueError {
    #[error("not a number: {0:?}")]
    BadNumber(String),
    #[error("not a boolean (Yes/No): {0:?}")]
    BadBool(String),
    #[error("bad binary value: {0:?}")]
    BadBinary(String),
}

/// One key=value pair, borrowing from the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair<'a> {
    pub key: &'a str,
    pub value: &'a str,
}

/// True if the character may appear in a key name (RFC 7143 §6.1:
/// letters, digits, '.', '-', '+', '@', '_'; plus '#' for the IANA-registered
/// `X#` keys of §13.24 such as `X#NodeArchitecture`).
fn key_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+' | b'@' | b'_' | b'#')
}

/// Whether a key may carry values longer than 255 bytes.
pub fn allows_large_value(key: &str) -> bool {
    matches!(key, "CHAP_C" | "CHAP_R")
}

/// Validate a key name.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(key_char)
}

/// Parse a complete (reassembled) text segment. Empty entries produced by
/// doubled NULs are skipped; a trailing fragment without NUL is an error.
pub fn parse(data: &[u8]) -> Result<Vec<Pair<'_>>, TextError> {
    let text = std::str::from_utf8(data).map_err(|_| TextError::NotUtf8)?;
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let Some(body) = text.strip_suffix('\0') else {
        return Err(TextError::Unterminated);
    };
    let mut out = Vec::new();
    for item in body.split('\0') {
        if item.is_empty() {
            continue;
        }
        let Some((key, value)) = item.split_once('=') else {
            return Err(TextError::MissingEquals(truncate(item)));
        };
        if !valid_key(key) {
            return Err(TextError::BadKey(truncate(key)));
        }
        let max = if allows_large_value(key) {
            MAX_LARGE_VALUE_LEN
        } else {
            MAX_VALUE_LEN
        };
        if value.len() > max {
            return Err(TextError::ValueTooLong(key.to_string()));
        }
        out.push(Pair { key, value });
    }
    Ok(out)
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Builder for outgoing text segments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextBuilder {
    buf: Vec<u8>,
}

impl TextBuilder {
    /// Empty builder.
    pub fn new() -> Self {
        Self::default()
    }
    /// Append `key=value\0`.
    pub fn push(&mut self, key: &str, value: &str) -> &mut Self {
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.push(b'=');
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(0);
        self
    }
    /// True if nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
    /// Take the encoded bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// Parse a numerical value: decimal, hex with `0x`/`0X`, or base64 with
/// `0b`/`0B` (RFC 7143 §6.1 encodings; base64 is strictly only for large
/// numerical values but is accepted everywhere), up to 64 bits.
pub fn parse_number(s: &str) -> Result<u64, ValueError> {
    let bad = || ValueError::BadNumber(truncate(s));
    if s.starts_with("0b") || s.starts_with("0B") {
        let bytes = parse_binary(s).map_err(|_| bad())?;
        if bytes.len() > 8 {
            return Err(bad());
        }
        return Ok(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)));
    }
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        return u64::from_str_radix(hex, 16).map_err(|_| bad());
    }
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    s.parse::<u64>().map_err(|_| bad())
}

/// Parse `Yes`/`No` (case-sensitive).
pub fn parse_bool(s: &str) -> Result<bool, ValueError> {
    match s {
        "Yes" => Ok(true),
        "No" => Ok(false),
        _ => Err(ValueError::BadBool(truncate(s))),
    }
}

/// Encode a boolean as `Yes`/`No`.
pub fn bool_str(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

/// Split a list value on commas.
pub fn parse_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',')
}

/// Parse a binary value: `0x`/`0X` hex or `0b`/`0B` base64 (RFC 7143 §6.1).
pub fn parse_binary(s: &str) -> Result<Vec<u8>, ValueError> {
    let bad = || ValueError::BadBinary(truncate(s));
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() {
            return Err(bad());
        }
        // An odd number of digits has an implied leading zero.
        let mut out = Vec::with_capacity(hex.len().div_ceil(2));
        let digits: Vec<u8> = hex
            .bytes()
            .map(|c| (c as char).to_digit(16).map(|d| d as u8))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(bad)?;
        let mut it = digits.iter();
        if digits.len() % 2 == 1 {
            if let Some(d) = it.next() {
                out.push(*d);
            }
        }
        while let (Some(h), Some(l)) = (it.next(), it.next()) {
            out.push((h << 4) | l);
        }
        return Ok(out);
    }
    if let Some(b64) = s.strip_prefix("0b").or_else(|| s.strip_prefix("0B")) {
        return base64_decode(b64).ok_or_else(bad);
    }
    Err(bad())
}

/// Encode binary as `0x` + lowercase hex.
pub fn hex_value(data: &[u8]) -> String {
    let mut s = String::with_capacity(2 + data.len() * 2);
    s.push_str("0x");
    for b in data {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    }
    let bytes = s.as_bytes();
    if bytes.is_empty() || bytes.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let chunks = bytes.chunks(4);
    let n = chunks.len();
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let last = i + 1 == n;
        let pads = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pads > 2 || (pads > 0 && !last) {
            return None;
        }
        let mut acc = 0u32;
        for &c in chunk.iter().take(4 - pads) {
            acc = (acc << 6) | val(c)?;
        }
        acc <<= 6 * pads as u32;
        let b = acc.to_be_bytes();
        out.extend_from_slice(b.get(1..4 - pads).unwrap_or(&[]));
    }
    Some(out)
}

/// Reassembles text split over several PDUs with the C bit (RFC 7143 §11.10.2)
/// under a size bound.
#[derive(Debug, Clone)]
pub struct TextAssembler {
    buf: Vec<u8>,
    limit: usize,
}

impl TextAssembler {
    /// New assembler refusing more than `limit` bytes in total.
    pub fn new(limit: usize) -> Self {
        TextAssembler {
            buf: Vec::new(),
            limit,
        }
    }

    /// Add one PDU's data. Returns `Some(complete text)` when `continues` is
    /// false (this PDU ends the text), `None` while more PDUs are expected.
    pub fn push(&mut self, data: &[u8], continues: bool) -> Result<Option<Vec<u8>>, TextError> {
        if self.buf.len().saturating_add(data.len()) > self.limit {
            self.buf.clear();
            return Err(TextError::TooLarge(self.limit));
        }
        self.buf.extend_from_slice(data);
        if continues {
            Ok(None)
        } else {
            Ok(Some(std::mem::take(&mut self.buf)))
        }
    }

    /// True while a partial text is buffered.
    pub fn in_progress(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Drop any partial text.
    pub fn reset(&mut self) {
        self.buf.clear();
    }
}

/// Split an outgoing text into chunks of at most `max` bytes (the peer's
/// MaxRecvDataSegmentLength); all but the last go out with C=1.
pub fn chunks(data: &[u8], max: usize) -> impl Iterator<Item = &[u8]> {
    data.chunks(max.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_basic() {
        let p = parse(b"InitiatorName=iqn.1994-05.com.redhat:x\0SessionType=Normal\0").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].key, "InitiatorName");
        assert_eq!(p[0].value, "iqn.1994-05.com.redhat:x");
        assert_eq!(p[1].value, "Normal");
        assert_eq!(parse(b"").unwrap(), vec![]);
        // value may contain '='
        assert_eq!(parse(b"X-a=b=c\0").unwrap()[0].value, "b=c");
        // empty value allowed
        assert_eq!(parse(b"SendTargets=\0").unwrap()[0].value, "");
        // doubled NULs skipped
        assert_eq!(parse(b"A=1\0\0B=2\0").unwrap().len(), 2);
    }

    #[test]
    fn parse_errors() {
        assert_eq!(parse(b"A=1"), Err(TextError::Unterminated));
        assert_eq!(parse(b"A=1\0B"), Err(TextError::Unterminated));
        assert!(matches!(parse(b"A\0"), Err(TextError::MissingEquals(_))));
        assert!(matches!(parse(b"=1\0"), Err(TextError::BadKey(_))));
        assert!(matches!(parse(b"A B=1\0"), Err(TextError::BadKey(_))));
        assert_eq!(parse(b"A=\xff\0"), Err(TextError::NotUtf8));
        let long_key = format!("{}=1\0", "K".repeat(64));
        assert!(matches!(
            parse(long_key.as_bytes()),
            Err(TextError::BadKey(_))
        ));
        let ok_key = format!("{}=1\0", "K".repeat(63));
        assert!(parse(ok_key.as_bytes()).is_ok());
        let long_val = format!("A={}\0", "v".repeat(256));
        assert!(matches!(
            parse(long_val.as_bytes()),
            Err(TextError::ValueTooLong(_))
        ));
        let ok_val = format!("A={}\0", "v".repeat(255));
        assert!(parse(ok_val.as_bytes()).is_ok());
        let chap = format!("CHAP_C=0x{}\0", "ab".repeat(1000));
        assert!(parse(chap.as_bytes()).is_ok());
    }

    #[test]
    fn numbers_and_bools() {
        assert_eq!(parse_number("8192"), Ok(8192));
        assert_eq!(parse_number("0x2000"), Ok(8192));
        assert_eq!(parse_number("0X2000"), Ok(8192));
        assert_eq!(parse_number("007"), Ok(7));
        assert_eq!(parse_number("0bIAA="), Ok(8192));
        assert!(parse_number("0bAAAAAAAAAAAA").is_err());
        assert!(parse_number("").is_err());
        assert!(parse_number("-1").is_err());
        assert!(parse_number("+1").is_err());
        assert!(parse_number("1k").is_err());
        assert!(parse_number("0x").is_err());
        assert!(parse_number("99999999999999999999999").is_err());
        assert_eq!(parse_bool("Yes"), Ok(true));
        assert_eq!(parse_bool("No"), Ok(false));
        assert!(parse_bool("yes").is_err());
        assert_eq!(
            parse_list("CRC32C,None").collect::<Vec<_>>(),
            ["CRC32C", "None"]
        );
    }

    #[test]
    fn binary_values() {
        assert_eq!(parse_binary("0x0102ff"), Ok(vec![1, 2, 0xff]));
        assert_eq!(parse_binary("0x102"), Ok(vec![1, 2]));
        assert_eq!(parse_binary("0bAQL/"), Ok(vec![1, 2, 0xff]));
        assert_eq!(parse_binary("0bAQI="), Ok(vec![1, 2]));
        assert_eq!(parse_binary("0bAQ=="), Ok(vec![1]));
        assert!(parse_binary("0bAQ=").is_err());
        assert!(parse_binary("0bA=Q=").is_err());
        assert!(parse_binary("0xzz").is_err());
        assert!(parse_binary("1234").is_err());
        assert_eq!(hex_value(&[0, 0xab]), "0x00ab");
    }

    #[test]
    fn builder_roundtrip() {
        let mut b = TextBuilder::new();
        b.push("HeaderDigest", "None")
            .push("MaxBurstLength", "262144");
        let bytes = b.into_bytes();
        assert_eq!(bytes, b"HeaderDigest=None\0MaxBurstLength=262144\0");
        let p = parse(&bytes).unwrap();
        assert_eq!(
            p[1],
            Pair {
                key: "MaxBurstLength",
                value: "262144"
            }
        );
    }

    #[test]
    fn assembler() {
        let mut a = TextAssembler::new(16);
        assert_eq!(a.push(b"A=1\0B", true), Ok(None));
        assert!(a.in_progress());
        assert_eq!(a.push(b"=2\0", false), Ok(Some(b"A=1\0B=2\0".to_vec())));
        assert!(!a.in_progress());
        assert_eq!(a.push(&[b'x'; 10], true), Ok(None));
        assert_eq!(a.push(&[b'x'; 10], true), Err(TextError::TooLarge(16)));
        assert!(!a.in_progress());
        let v: Vec<_> = chunks(b"abcdefg", 3).collect();
        assert_eq!(v, vec![&b"abc"[..], b"def", b"g"]);
    }

    proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&data);
        }
        #[test]
        fn values_never_panic(s in ".{0,40}") {
            let _ = parse_number(&s);
            let _ = parse_binary(&s);
            let _ = parse_bool(&s);
        }
        #[test]
        fn builder_parse_roundtrip(
            pairs in proptest::collection::vec(("[A-Za-z0-9.+@_-]{1,63}", "[^\u{0}]{0,60}"), 0..10)
        ) {
            let mut b = TextBuilder::new();
            for (k, v) in &pairs {
                b.push(k, v);
            }
            let bytes = b.into_bytes();
            let parsed = parse(&bytes).unwrap();
            prop_assert_eq!(parsed.len(), pairs.len());
            for (p, (k, v)) in parsed.iter().zip(&pairs) {
                prop_assert_eq!(p.key, k.as_str());
                prop_assert_eq!(p.value, v.as_str());
            }
        }

        #[test]
        fn hex_roundtrip(data in proptest::collection::vec(any::<u8>(), 1..64)) {
            prop_assert_eq!(parse_binary(&hex_value(&data)).unwrap(), data);
        }
    }
}
