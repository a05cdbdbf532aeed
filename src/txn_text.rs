//! The textual form of a transaction that `client <id> txn` reads from stdin, and the text and
//! JSON forms of results that the data commands print.
//!
//! ```text
//!   # a comment; blank lines are skipped
//!   if <key> version|create|mod|value =|!=|<|> <number or value>     (all must hold)
//!   then put <key> <value>
//!   then del <key>
//!   then del-prefix <prefix>
//!   then get <key>
//!   else put|del|del-prefix|get ...                                    (when one fails)
//! ```
//!
//! Words are separated by spaces; a word in double quotes may hold spaces and the escapes
//! `\"`, `\\`, `\n`, `\t` and `\xHH` (any byte). For example, taking a lock:
//!
//! ```text
//!   if lock version = 0
//!   then put lock "owner 7"
//!   else get lock
//! ```

use kvraft_common::limits::prefix_end;
use kvslib::{CmpOp, Compare, Target, Txn, TxnOp, TxnOpOutcome, TxnOutcome, Versioned};
use serde_json::{json, Value};

/// Splits a line into words (see the module docs for quoting).
pub fn words(line: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(&first) = chars.peek() else {
            return Ok(out);
        };
        let mut word = Vec::new();
        if first != '"' {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                push_char(&mut word, c);
            }
            out.push(word);
            continue;
        }
        chars.next();
        loop {
            match chars.next() {
                None => return Err("a quoted word is not closed".into()),
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some('"') => word.push(b'"'),
                    Some('\\') => word.push(b'\\'),
                    Some('n') => word.push(b'\n'),
                    Some('t') => word.push(b'\t'),
                    Some('x') => {
                        let hex: String = chars.by_ref().take(2).collect();
                        let byte = u8::from_str_radix(&hex, 16)
                            .map_err(|_| format!("\\x{hex} is not a byte in hex"))?;
                        word.push(byte);
                    }
                    Some(c) => return Err(format!("unknown escape \\{c}")),
                    None => return Err("a quoted word ends in a backslash".into()),
                },
                Some(c) => push_char(&mut word, c),
            }
        }
        if chars.peek().is_some_and(|c| !c.is_whitespace()) {
            return Err("a quoted word runs into the next one".into());
        }
        out.push(word);
    }
}

fn push_char(word: &mut Vec<u8>, c: char) {
    let mut buf = [0; 4];
    word.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

/// Parses a transaction; an error names the line and what is wrong with it.
pub fn parse_txn(text: &str) -> Result<Txn, String> {
    let mut txn = Txn::new();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}", n + 1);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words = words(line).map_err(at)?;
        let text = |w: &[u8]| String::from_utf8_lossy(w).into_owned();
        match words.first().map(|w| &w[..]) {
            Some(b"if") => txn.compares.push(parse_compare(&words[1..]).map_err(at)?),
            Some(b"then") => txn.success.push(parse_op(&words[1..]).map_err(at)?),
            Some(b"else") => txn.failure.push(parse_op(&words[1..]).map_err(at)?),
            Some(other) => {
                return Err(at(format!(
                    "starts with {:?}; a line is `if ...`, `then ...` or `else ...`",
                    text(other)
                )))
            }
            None => {}
        }
    }
    if txn.success.is_empty() && txn.failure.is_empty() {
        return Err("the transaction has no `then` or `else` operation".into());
    }
    Ok(txn)
}

fn parse_compare(words: &[Vec<u8>]) -> Result<Compare, String> {
    let [key, target, op, against] = words else {
        return Err("usage: if <key> version|create|mod|value =|!=|<|> <number or value>".into());
    };
    let op = match &op[..] {
        b"=" | b"==" => CmpOp::Equal,
        b"!=" => CmpOp::NotEqual,
        b"<" => CmpOp::Less,
        b">" => CmpOp::Greater,
        other => {
            return Err(format!(
                "unknown comparison {:?}; use =, !=, < or >",
                String::from_utf8_lossy(other)
            ))
        }
    };
    let number = || {
        std::str::from_utf8(against)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| {
                format!(
                    "{:?} is not a number (versions and revisions are whole numbers)",
                    String::from_utf8_lossy(against)
                )
            })
    };
    let target = match &target[..] {
        b"version" => Target::Version(number()?),
        b"create" => Target::CreateRevision(number()?),
        b"mod" => Target::ModRevision(number()?),
        b"value" => Target::Value(against.clone()),
        other => {
            return Err(format!(
                "unknown target {:?}; use version, create, mod or value",
                String::from_utf8_lossy(other)
            ))
        }
    };
    Ok(Compare {
        key: key.clone(),
        op,
        target,
    })
}

fn parse_op(words: &[Vec<u8>]) -> Result<TxnOp, String> {
    match words {
        [verb, key, value] if verb == b"put" => Ok(TxnOp::put(key.clone(), value.clone())),
        [verb, key] if verb == b"del" => Ok(TxnOp::delete(key.clone())),
        [verb, prefix] if verb == b"del-prefix" => Ok(TxnOp::DeleteRange {
            start: prefix.clone(),
            end: prefix_end(prefix),
        }),
        [verb, key] if verb == b"get" => Ok(TxnOp::get(key.clone())),
        _ => Err(
            "usage: then|else put <key> <value> | del <key> | del-prefix <prefix> | get <key>"
                .into(),
        ),
    }
}

/// Bytes shown as text: as they are if UTF-8, else quoted with escapes.
pub fn show(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => format!("\"{}\"", bytes.escape_ascii()),
    }
}

/// Bytes in JSON: a string if UTF-8, else `{"hex": "..."}`.
pub fn bytes_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => Value::from(s),
        Err(_) => {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            json!({ "hex": hex })
        }
    }
}

/// A key's value and counters in JSON.
pub fn versioned_json(key: &[u8], v: &Versioned) -> Value {
    json!({
        "key": bytes_json(key),
        "value": bytes_json(&v.value),
        "version": v.version,
        "create_revision": v.create_revision,
        "mod_revision": v.mod_revision,
    })
}

/// The ops of the branch that ran, paired with their results.
fn branch<'a>(txn: &'a Txn, out: &TxnOutcome) -> &'a [TxnOp] {
    if out.succeeded {
        &txn.success
    } else {
        &txn.failure
    }
}

fn op_key(op: &TxnOp) -> &[u8] {
    match op {
        TxnOp::Put { key, .. } | TxnOp::Delete { key } | TxnOp::Get { key } => key,
        TxnOp::DeleteRange { start, .. } => start,
    }
}

/// One line for the outcome, then one per operation.
pub fn describe_txn(txn: &Txn, out: &TxnOutcome) -> Vec<String> {
    let verdict = if out.succeeded { "succeeded" } else { "failed" };
    let mut lines = vec![format!("{verdict} (revision {})", out.revision)];
    for (op, result) in branch(txn, out).iter().zip(&out.results) {
        let key = show(op_key(op));
        lines.push(match result {
            TxnOpOutcome::Put { version } => format!("put {key}: version {version}"),
            TxnOpOutcome::Delete { deleted, more } => format!(
                "del {key}: {deleted} deleted{}",
                if *more { ", more remain" } else { "" }
            ),
            TxnOpOutcome::Get { value: None, .. } => format!("get {key}: (not found)"),
            TxnOpOutcome::Get {
                value: Some(v),
                value_omitted,
            } => format!(
                "get {key}: {} (version {}, mod revision {})",
                if *value_omitted {
                    "(value omitted: read budget spent)".to_string()
                } else {
                    show(&v.value)
                },
                v.version,
                v.mod_revision
            ),
        });
    }
    lines
}

pub fn txn_json(txn: &Txn, out: &TxnOutcome) -> Value {
    let results: Vec<Value> = branch(txn, out)
        .iter()
        .zip(&out.results)
        .map(|(op, result)| {
            let key = bytes_json(op_key(op));
            match result {
                TxnOpOutcome::Put { version } => {
                    json!({"op": "put", "key": key, "version": version})
                }
                TxnOpOutcome::Delete { deleted, more } => {
                    json!({"op": "del", "key": key, "deleted": deleted, "more": more})
                }
                TxnOpOutcome::Get {
                    value,
                    value_omitted,
                } => json!({
                    "op": "get",
                    "key": key,
                    "found": value.is_some(),
                    "kv": value.as_ref().map(|v| versioned_json(op_key(op), v)),
                    "value_omitted": value_omitted,
                }),
            }
        })
        .collect();
    json!({"succeeded": out.succeeded, "revision": out.revision, "results": results})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_and_unquote() {
        let w = words(r#"put  "a key" "x\"y\\\x00" plain"#).unwrap();
        assert_eq!(
            w,
            vec![
                b"put".to_vec(),
                b"a key".to_vec(),
                b"x\"y\\\0".to_vec(),
                b"plain".to_vec()
            ]
        );
        assert!(words(r#""open"#).is_err());
        assert!(words(r#""a"b"#).is_err());
        assert!(words(r#""\q""#).is_err());
        assert!(words(r#""\xzz""#).is_err());
    }

    #[test]
    fn a_lock_transaction_parses() {
        let txn = parse_txn(
            "# take the lock\n\nif lock version = 0\nthen put lock \"owner 7\"\nelse get lock\n",
        )
        .unwrap();
        assert_eq!(
            txn,
            Txn::new()
                .when(Compare::version("lock", CmpOp::Equal, 0))
                .then(TxnOp::put("lock", "owner 7"))
                .otherwise(TxnOp::get("lock"))
        );
        let txn =
            parse_txn("if k mod < 10\nif k value != x\nthen del-prefix p/\nthen del k").unwrap();
        assert_eq!(txn.compares.len(), 2);
        assert_eq!(
            txn.success[0],
            TxnOp::DeleteRange {
                start: b"p/".to_vec(),
                end: b"p0".to_vec()
            }
        );
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse_txn("if k version = 0\nthen frob k").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
        let e = parse_txn("if k version = x\nthen get k").unwrap_err();
        assert!(e.contains("not a number"), "{e}");
        let e = parse_txn("if k size = 1\nthen get k").unwrap_err();
        assert!(e.contains("unknown target"), "{e}");
        assert!(parse_txn("if k version = 1")
            .unwrap_err()
            .contains("no `then`"));
        assert!(parse_txn("when k").unwrap_err().contains("line 1"));
    }

    #[test]
    fn results_describe_the_branch_that_ran() {
        let txn = Txn::new()
            .when(Compare::version("k", CmpOp::Equal, 0))
            .then(TxnOp::put("k", "v"))
            .otherwise(TxnOp::get("k"));
        let out = TxnOutcome {
            succeeded: false,
            revision: 9,
            results: vec![TxnOpOutcome::Get {
                value: Some(Versioned {
                    value: b"old".to_vec(),
                    version: 2,
                    create_revision: 3,
                    mod_revision: 8,
                }),
                value_omitted: false,
            }],
        };
        assert_eq!(
            describe_txn(&txn, &out),
            vec![
                "failed (revision 9)",
                "get k: old (version 2, mod revision 8)"
            ]
        );
        assert_eq!(txn_json(&txn, &out)["results"][0]["kv"]["version"], 2);
        assert_eq!(bytes_json(&[0xff]), json!({"hex": "ff"}));
    }
}
