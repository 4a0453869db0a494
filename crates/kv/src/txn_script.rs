//! The script language of `strata kv txn`: one operation per line, all applied atomically.
//!
//! ```text
//! # move 10 from alice to bob
//! get alice
//! put alice 90
//! put "bob smith" "110"
//! cas counter 7 8        # compare-and-set: fails the transaction unless counter == 7
//! cas fresh - 1          # '-' means "absent"
//! del old
//! scan a z 100           # keys in [a, z), at most 100
//! ```
//! Words are separated by spaces; a word may be double-quoted, with `\"`, `\\`, `\n`, `\t` and
//! `\xHH` escapes. `#` starts a comment outside quotes.

use crate::{KEY_BYTES_MAX, VALUE_BYTES_MAX};

/// Most operations one script may hold; a transaction's write set is buffered in the client.
pub const TXN_OPS_MAX: usize = 10_000;
/// Most keys one scan may return.
pub const SCAN_LIMIT_MAX: usize = 100_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    Get { key: Vec<u8> },
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
    /// Compare-and-set; `expected = None` means the key must be absent.
    Cas { key: Vec<u8>, expected: Option<Vec<u8>>, value: Vec<u8> },
    Scan { start: Vec<u8>, end: Vec<u8>, limit: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("txn script line {line}: {reason}")]
pub struct ScriptError {
    pub line: usize,
    pub reason: String,
}

pub fn parse(script: &str) -> Result<Vec<TxnOp>, ScriptError> {
    let mut ops = Vec::new();
    for (i, raw) in script.lines().enumerate() {
        let line = i + 1;
        let err = |reason: String| ScriptError { line, reason };
        let words = split_words(raw).map_err(err)?;
        if words.is_empty() {
            continue;
        }
        if ops.len() == TXN_OPS_MAX {
            return Err(err(format!("more than {TXN_OPS_MAX} operations in one transaction")));
        }
        let verb = String::from_utf8_lossy(&words[0]).to_ascii_lowercase();
        let args = &words[1..];
        let want = |n: usize, usage: &str| -> Result<(), ScriptError> {
            if args.len() == n {
                Ok(())
            } else {
                Err(ScriptError { line, reason: format!("'{verb}' takes {n} argument(s): {usage}") })
            }
        };
        let key = |k: &Vec<u8>| -> Result<Vec<u8>, ScriptError> {
            if k.is_empty() || k.len() > KEY_BYTES_MAX {
                Err(ScriptError { line, reason: format!("key must be 1..={KEY_BYTES_MAX} bytes, got {}", k.len()) })
            } else {
                Ok(k.clone())
            }
        };
        let value = |v: &Vec<u8>| -> Result<Vec<u8>, ScriptError> {
            if v.len() > VALUE_BYTES_MAX {
                Err(ScriptError { line, reason: format!("value is {} bytes, limit {VALUE_BYTES_MAX}", v.len()) })
            } else {
                Ok(v.clone())
            }
        };
        let op = match verb.as_str() {
            "get" => {
                want(1, "get KEY")?;
                TxnOp::Get { key: key(&args[0])? }
            }
            "put" => {
                want(2, "put KEY VALUE")?;
                TxnOp::Put { key: key(&args[0])?, value: value(&args[1])? }
            }
            "del" | "delete" => {
                want(1, "del KEY")?;
                TxnOp::Delete { key: key(&args[0])? }
            }
            "cas" => {
                want(3, "cas KEY EXPECTED|- NEW")?;
                let expected = if args[1] == b"-" { None } else { Some(value(&args[1])?) };
                TxnOp::Cas { key: key(&args[0])?, expected, value: value(&args[2])? }
            }
            "scan" => {
                if args.len() != 2 && args.len() != 3 {
                    return Err(err("'scan' takes 2 or 3 arguments: scan START END [LIMIT]".into()));
                }
                let limit = match args.get(2) {
                    None => 1000,
                    Some(l) => match std::str::from_utf8(l).ok().and_then(|s| s.parse::<usize>().ok()) {
                        Some(n) if (1..=SCAN_LIMIT_MAX).contains(&n) => n,
                        _ => return Err(err(format!("scan limit must be 1..={SCAN_LIMIT_MAX}"))),
                    },
                };
                TxnOp::Scan { start: args[0].clone(), end: args[1].clone(), limit }
            }
            other => return Err(err(format!("unknown operation '{other}' (get, put, del, cas, scan)"))),
        };
        ops.push(op);
    }
    Ok(ops)
}

fn split_words(line: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut words = Vec::new();
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b' ' | b'\t' | b'\r' => i += 1,
            b'#' => break,
            b'"' => {
                let quote_col = i + 1;
                let mut w = Vec::new();
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err(format!("unterminated quote starting at column {quote_col}")),
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') => {
                            let (byte, used) = unescape(&b[i + 1..]).ok_or_else(|| format!("bad escape at column {}", i + 1))?;
                            w.push(byte);
                            i += 1 + used;
                        }
                        Some(&c) => {
                            w.push(c);
                            i += 1;
                        }
                    }
                }
                words.push(w);
            }
            _ => {
                let start = i;
                while i < b.len() && !matches!(b[i], b' ' | b'\t' | b'\r' | b'#') {
                    if b[i] == b'"' {
                        return Err(format!("quote inside a word at column {}", i + 1));
                    }
                    i += 1;
                }
                words.push(b[start..i].to_vec());
            }
        }
    }
    Ok(words)
}

fn unescape(rest: &[u8]) -> Option<(u8, usize)> {
    match rest.first()? {
        b'"' => Some((b'"', 1)),
        b'\\' => Some((b'\\', 1)),
        b'n' => Some((b'\n', 1)),
        b't' => Some((b'\t', 1)),
        b'x' => {
            let hex = std::str::from_utf8(rest.get(1..3)?).ok()?;
            Some((u8::from_str_radix(hex, 16).ok()?, 3))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_operation() {
        let ops = parse(
            "# transfer\nget alice\nput alice 90\nput \"bob smith\" \"1\\x0a0\"\ncas c 7 8 # inline\ncas fresh - 1\ndel old\nscan a z 5\n\n",
        )
        .unwrap();
        assert_eq!(
            ops,
            vec![
                TxnOp::Get { key: b"alice".to_vec() },
                TxnOp::Put { key: b"alice".to_vec(), value: b"90".to_vec() },
                TxnOp::Put { key: b"bob smith".to_vec(), value: b"1\n0".to_vec() },
                TxnOp::Cas { key: b"c".to_vec(), expected: Some(b"7".to_vec()), value: b"8".to_vec() },
                TxnOp::Cas { key: b"fresh".to_vec(), expected: None, value: b"1".to_vec() },
                TxnOp::Delete { key: b"old".to_vec() },
                TxnOp::Scan { start: b"a".to_vec(), end: b"z".to_vec(), limit: 5 },
            ]
        );
    }

    #[test]
    fn errors_name_the_line() {
        for (script, line, needle) in [
            ("get a\nfrob b", 2, "unknown operation"),
            ("put a", 1, "put KEY VALUE"),
            ("get a\n\nput \"x y", 3, "unterminated"),
            ("scan a z 0", 1, "limit"),
            ("put a\"b c", 1, "quote inside"),
            ("get \"\"", 1, "key must be"),
            ("put k \"\\q\"", 1, "bad escape"),
        ] {
            let e = parse(script).expect_err(script);
            assert_eq!(e.line, line, "{script}: {e}");
            assert!(e.to_string().contains(needle), "{script}: {e}");
            assert!(e.to_string().starts_with(&format!("txn script line {line}:")));
        }
        let long = format!("get {}", "k".repeat(KEY_BYTES_MAX + 1));
        assert!(parse(&long).unwrap_err().reason.contains("key must be"));
    }
}
