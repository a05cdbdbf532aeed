//! Trace events and tokens read and written in their protobuf wire form (`TraceEvent`,
//! `TraceToken` in `kvraft.proto`) without building the generated messages.
//!
//! ```text
//!   token bytes ──decode_token──▶ TokenView { identity, trace_id, clock: [(id, n)] } ─▶ merge
//!   clock (sorted map) ──encode_token──▶ token bytes         (same bytes as prost would write)
//!   event bytes ──decode_event──▶ EventView { trace_id, tag, body, clock } ─▶ the log files
//! ```
//!
//! Every traced hop decodes a token and encodes one, and the tracing server decodes every
//! event: the generated messages hold the clock as a `HashMap<String, u64>`, so each of those
//! cost a string allocation and a SipHash per clock entry and a sort to print it. The views
//! borrow the strings from the bytes and keep the clock as a vector sorted by identity. The
//! wire format is unchanged, so either side may use the generated messages.
//!
//! Decoding follows protobuf's rules: fields in any order, unknown fields skipped, a repeated
//! map key keeps its last value, missing fields are empty or zero; strings must be UTF-8.

use std::collections::BTreeMap;

use prost::bytes::BufMut;
use prost::encoding::{decode_varint, encode_key, encode_varint, encoded_len_varint, WireType};

/// A clock as the wire carries it, sorted by identity, each identity once.
pub type WireClock<'a> = Vec<(&'a str, u64)>;

/// A decoded `TraceEvent`, borrowing from its bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventView<'a> {
    pub trace_id: u64,
    pub tag: &'a str,
    pub body: &'a str,
    pub clock: WireClock<'a>,
}

impl EventView<'_> {
    /// A generated message seen as a view (its clock sorted).
    pub fn of_message(e: &kvraft_proto::TraceEvent) -> EventView<'_> {
        let mut clock: WireClock<'_> = e.clock.iter().map(|(k, &v)| (k.as_str(), v)).collect();
        clock.sort_unstable();
        EventView {
            trace_id: e.trace_id,
            tag: &e.tag,
            body: &e.body,
            clock,
        }
    }

    /// The counter of `identity` in the event's clock (0 if absent).
    pub fn counter(&self, identity: &str) -> u64 {
        counter(&self.clock, identity)
    }
}

/// A decoded `TraceToken`, borrowing from its bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenView<'a> {
    pub identity: &'a str,
    pub trace_id: u64,
    pub clock: WireClock<'a>,
}

/// The counter of `identity` in a sorted clock (0 if absent).
pub fn counter(clock: &[(&str, u64)], identity: &str) -> u64 {
    clock
        .binary_search_by(|(id, _)| (*id).cmp(identity))
        .map_or(0, |i| clock[i].1)
}

/// One field of a message.
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// A fixed-width field (skipped by every reader here).
    Fixed,
}

/// The fields of a message in wire order.
fn fields<'a>(mut buf: &'a [u8]) -> impl Iterator<Item = Result<(u32, Value<'a>), String>> {
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        Some(next_field(&mut buf))
    })
}

fn next_field<'a>(buf: &mut &'a [u8]) -> Result<(u32, Value<'a>), String> {
    let key = decode_varint(buf).map_err(|e| format!("bad field key: {e}"))?;
    let field =
        u32::try_from(key >> 3).map_err(|_| format!("field number {} too large", key >> 3))?;
    let value = match key & 7 {
        0 => Value::Varint(decode_varint(buf).map_err(|e| format!("field {field}: {e}"))?),
        1 | 5 => {
            let width = if key & 7 == 1 { 8 } else { 4 };
            if buf.len() < width {
                return Err(format!("field {field}: truncated"));
            }
            *buf = &buf[width..];
            Value::Fixed
        }
        2 => {
            let len = decode_varint(buf).map_err(|e| format!("field {field}: {e}"))?;
            let len = usize::try_from(len)
                .ok()
                .filter(|l| *l <= buf.len())
                .ok_or_else(|| format!("field {field}: length {len} past the end"))?;
            let (bytes, rest) = buf.split_at(len);
            *buf = rest;
            Value::Bytes(bytes)
        }
        other => return Err(format!("field {field}: wire type {other} is not supported")),
    };
    Ok((field, value))
}

fn text(field: u32, bytes: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(bytes).map_err(|_| format!("field {field} is not UTF-8"))
}

/// One `map<string, uint64>` entry.
fn map_entry(bytes: &[u8]) -> Result<(&str, u64), String> {
    let (mut key, mut value) = ("", 0);
    for f in fields(bytes) {
        match f? {
            (1, Value::Bytes(b)) => key = text(1, b)?,
            (2, Value::Varint(v)) => value = v,
            _ => {}
        }
    }
    Ok((key, value))
}

/// Sorts a clock by identity; a repeated identity keeps its last value (protobuf's rule).
fn normalize(clock: &mut WireClock<'_>) {
    if clock.windows(2).all(|w| w[0].0 < w[1].0) {
        return; // what every encoder here writes
    }
    clock.reverse();
    clock.sort_by(|a, b| a.0.cmp(b.0)); // stable: the last value of an identity comes first
    clock.dedup_by(|later, first| later.0 == first.0);
}

/// Reads a `TraceEvent` (clock in field 4).
pub fn decode_event(bytes: &[u8]) -> Result<EventView<'_>, String> {
    let mut e = EventView::default();
    for f in fields(bytes) {
        match f? {
            (1, Value::Varint(v)) => e.trace_id = v,
            (2, Value::Bytes(b)) => e.tag = text(2, b)?,
            (3, Value::Bytes(b)) => e.body = text(3, b)?,
            (4, Value::Bytes(b)) => e.clock.push(map_entry(b)?),
            _ => {}
        }
    }
    normalize(&mut e.clock);
    Ok(e)
}

/// Reads a `TraceToken` (identity 1, trace id 2, clock 3).
pub fn decode_token(bytes: &[u8]) -> Result<TokenView<'_>, String> {
    let mut t = TokenView::default();
    for f in fields(bytes) {
        match f? {
            (1, Value::Bytes(b)) => t.identity = text(1, b)?,
            (2, Value::Varint(v)) => t.trace_id = v,
            (3, Value::Bytes(b)) => t.clock.push(map_entry(b)?),
            _ => {}
        }
    }
    normalize(&mut t.clock);
    Ok(t)
}

/// Appends a length-delimited field.
pub(crate) fn bytes_field(out: &mut impl BufMut, tag: u32, bytes: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(bytes.len() as u64, out);
    out.put_slice(bytes);
}

/// Appends the entries of `clock` as the map field `tag`.
pub(crate) fn clock_field(out: &mut impl BufMut, tag: u32, clock: &BTreeMap<String, u64>) {
    for (identity, &counter) in clock {
        // A map entry: a message with the key as field 1 and the value as field 2.
        let key_len = 1 + encoded_len_varint(identity.len() as u64) + identity.len();
        let value_len = 1 + encoded_len_varint(counter);
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint((key_len + value_len) as u64, out);
        bytes_field(out, 1, identity.as_bytes());
        encode_key(2, WireType::Varint, out);
        encode_varint(counter, out);
    }
}

/// Writes a `TraceToken` carrying `clock`.
pub fn encode_token(identity: &str, trace_id: u64, clock: &BTreeMap<String, u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + identity.len() + clock.len() * 16);
    if !identity.is_empty() {
        bytes_field(&mut out, 1, identity.as_bytes());
    }
    if trace_id != 0 {
        encode_key(2, WireType::Varint, &mut out);
        encode_varint(trace_id, &mut out);
    }
    clock_field(&mut out, 3, clock);
    out
}

/// Appends `s` as a JSON string.
pub fn json_string(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).expect("invariant: a string serializes"));
    }
}

/// Appends a sorted clock as compact JSON (`{"a":1,"b":2}`), as `VClock::to_json` writes it.
pub fn clock_json(out: &mut String, clock: &[(&str, u64)]) {
    out.push('{');
    for (i, (id, n)) in clock.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_string(out, id);
        out.push(':');
        out.push_str(decimal(*n).as_str());
    }
    out.push('}');
}

/// `n` in decimal, without the formatting machinery.
pub fn decimal(mut n: u64) -> Decimal {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    Decimal { digits, start }
}

/// The digits [`decimal`] wrote.
pub struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.digits[self.start..]).expect("invariant: ASCII digits")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vclock::VClock;
    use kvraft_proto::{TraceEvent, TraceToken};
    use prost::Message;

    fn clock(entries: &[(&str, u64)]) -> BTreeMap<String, u64> {
        entries.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn decimal_matches_display() {
        for n in [0, 1, 9, 10, 99, 100, 12_345, u64::MAX - 1, u64::MAX] {
            assert_eq!(decimal(n).as_str(), n.to_string());
        }
    }

    #[test]
    fn tokens_match_the_generated_message_both_ways() {
        let c = clock(&[("server2", 1), ("client1", 4), ("coord", 300)]);
        let bytes = encode_token("client1", 77, &c);
        let msg = TraceToken::decode(&bytes[..]).unwrap();
        assert_eq!(msg.identity, "client1");
        assert_eq!(msg.trace_id, 77);
        assert_eq!(VClock::from_proto(&msg.clock).0, c);
        let reencoded = msg.encode_to_vec();
        let view = decode_token(&reencoded).unwrap();
        assert_eq!(view.identity, "client1");
        assert_eq!(view.trace_id, 77);
        assert_eq!(view.clock, [("client1", 4), ("coord", 300), ("server2", 1)]);
        assert_eq!(counter(&view.clock, "coord"), 300);
        assert_eq!(counter(&view.clock, "nobody"), 0);
    }

    #[test]
    fn events_match_the_generated_message_and_print_as_vclock_does() {
        let c = clock(&[("b", 2), ("a\"q", 1), ("é", 9)]);
        let msg = TraceEvent {
            trace_id: 5,
            tag: "PutRecvd".into(),
            body: "{\"key\":\"k\"}".into(),
            clock: VClock(c.clone()).to_proto(),
        };
        let bytes = msg.encode_to_vec();
        let view = decode_event(&bytes).unwrap();
        assert_eq!(
            (view.trace_id, view.tag, view.body),
            (5, "PutRecvd", "{\"key\":\"k\"}")
        );
        let mut json = String::new();
        clock_json(&mut json, &view.clock);
        assert_eq!(json, VClock(c).to_json());
    }

    #[test]
    fn repeated_identities_keep_the_last_value_and_damage_is_an_error() {
        let mut bytes = encode_token("x", 1, &clock(&[("a", 1), ("b", 2)]));
        let mut again = Vec::new();
        clock_field(&mut again, 3, &clock(&[("a", 9)]));
        bytes.extend_from_slice(&again);
        let view = decode_token(&bytes).unwrap();
        assert_eq!(view.clock, [("a", 9), ("b", 2)]);
        assert_eq!(
            TraceToken::decode(&bytes[..]).unwrap().clock["a"],
            9,
            "as prost decodes it"
        );
        for cut in 1..bytes.len() {
            let _ = decode_token(&bytes[..cut]); // never panics
        }
        assert!(decode_token(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_event(&[0x0b]).is_err(), "a group wire type");
        assert!(
            decode_event(&[0x1a, 0x01, 0xff]).is_err(),
            "a body that is not UTF-8"
        );
    }
}
