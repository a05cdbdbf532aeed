//! Reads a ShiViz log the way ShiViz does and checks the rules ShiViz enforces, so tests can
//! tell whether a log would load.
//!
//! ShiViz takes the first line as the parsing regex and the second as the (empty) delimiter,
//! applies the regex to the rest, reads each `clock` group as a JSON object and requires:
//! - per host, the host's own entry is 1 in its first event and rises by exactly 1 per event;
//! - every host named in any clock has events of its own;
//! - an event that names `h: n` has host `h`'s event `n` in its past: that event exists and its
//!   clock is entry-wise <= this one (so clocks are merges of their predecessors).
//!
//! Each host's events must also never lose knowledge: a clock is >= its host predecessor's.

use std::collections::BTreeMap;

use crate::server::SHIVIZ_REGEX;
use crate::vclock::VClock;

/// One event of a ShiViz log.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub host: String,
    pub clock: VClock,
    pub trace_id: u64,
    pub tag: String,
    pub body: serde_json::Value,
    /// Position in the log, from 0.
    pub line_pair: usize,
}

impl Event {
    pub fn own(&self) -> u64 {
        self.clock.get(&self.host)
    }

    pub fn happens_before(&self, other: &Event) -> bool {
        self.clock.happens_before(&other.clock)
    }
}

/// Parses `text` with its own first-line regex; errors say what ShiViz would reject.
pub fn parse(text: &str) -> Result<Vec<Event>, String> {
    let mut lines = text.splitn(3, '\n');
    let regex_line = lines.next().unwrap_or_default();
    if regex_line != SHIVIZ_REGEX {
        return Err(format!("line 1 is {regex_line:?}, not the ShiViz regex"));
    }
    if lines.next() != Some("") {
        return Err("line 2 (the delimiter) is not empty".into());
    }
    let rest = lines.next().unwrap_or_default();
    // ShiViz runs the line as a JavaScript regex, where a `{` that starts no quantifier is a
    // literal; Rust's regex syntax wants it escaped (the ShiViz regex has no quantifier braces).
    let rust_syntax = regex_line.replace('{', r"\{").replace('}', r"\}");
    let re = regex::Regex::new(&rust_syntax).map_err(|e| format!("bad regex: {e}"))?;
    let mut events = Vec::new();
    for (i, caps) in re.captures_iter(rest).enumerate() {
        let host = caps["host"].to_string();
        let clock: BTreeMap<String, u64> = serde_json::from_str(&caps["clock"])
            .map_err(|e| format!("event {i} ({host}): clock is not a JSON map: {e}"))?;
        let event_text = &caps["event"];
        let mut parts = event_text.splitn(3, ' ');
        let trace_id = parts
            .next()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| format!("event {i} ({host}): no trace id in {event_text:?}"))?;
        let tag = parts.next().unwrap_or_default().to_string();
        let body = serde_json::from_str(parts.next().unwrap_or("null"))
            .map_err(|e| format!("event {i} ({host}): body is not JSON: {e}"))?;
        events.push(Event {
            host,
            clock: VClock(clock),
            trace_id,
            tag,
            body,
            line_pair: i,
        });
    }
    let lines_after_header = rest.lines().count();
    if lines_after_header != 2 * events.len() {
        return Err(format!(
            "{lines_after_header} lines after the header but {} events matched the regex",
            events.len()
        ));
    }
    Ok(events)
}

/// Checks ShiViz's rules (module docs) on parsed events.
pub fn check(events: &[Event]) -> Result<(), String> {
    // (host, own counter) -> index of the event
    let mut by_host: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        let seen = by_host.entry(&e.host).or_default();
        let expected = seen.len() as u64 + 1;
        if e.own() != expected {
            return Err(format!(
                "event {i}: {} {} has own counter {}, expected {expected}",
                e.host,
                e.tag,
                e.own()
            ));
        }
        if let Some(&prev) = seen.last() {
            if !events[prev].clock.le(&e.clock) {
                return Err(format!(
                    "event {i}: {} {} clock {} is not >= its predecessor's {}",
                    e.host,
                    e.tag,
                    e.clock.to_json(),
                    events[prev].clock.to_json()
                ));
            }
        }
        seen.push(i);
    }
    for (i, e) in events.iter().enumerate() {
        for (host, &n) in &e.clock.0 {
            if n == 0 {
                continue;
            }
            let Some(indices) = by_host.get(host.as_str()) else {
                return Err(format!(
                    "event {i}: {} {} names host {host}, which has no events",
                    e.host, e.tag
                ));
            };
            let Some(&j) = indices.get(n as usize - 1) else {
                return Err(format!(
                    "event {i}: {} {} names {host}:{n}, but {host} has only {} events",
                    e.host,
                    e.tag,
                    indices.len()
                ));
            };
            if !events[j].clock.le(&e.clock) {
                return Err(format!(
                    "event {i}: {} {} names {host}:{n} whose clock {} is not <= {}",
                    e.host,
                    e.tag,
                    events[j].clock.to_json(),
                    e.clock.to_json()
                ));
            }
        }
    }
    Ok(())
}
