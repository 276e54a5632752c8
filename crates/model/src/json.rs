//! Strict JSON: what `serde_json` accepts, minus what it would silently change.
//!
//! `serde_json` keeps the last of duplicate object keys, turns an integer literal outside the
//! 64-bit range into a rounded float (2^64+1 becomes 1.8446744073709552e19) and a tiny literal
//! into 0.0 (1e-400). A flag document read that way is not the document the admin sent, so
//! [`parse_strict`] refuses such text with the JSON Pointer of every offending value.
//!
//! The check is a small scanner over the text (bounded by [`MAX_JSON_DEPTH`], iterative, one pass)
//! next to `serde_json`'s own parse; `serde_json`'s `arbitrary_precision` feature stays off because
//! it would change number handling in every crate of the workspace and slow evaluation.

use std::collections::HashSet;

use serde_json::Value;

use crate::limits::MAX_JSON_DEPTH;
use crate::{pointer, Problem, Problems};

/// Why a text was refused by [`parse_strict`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrictJsonError {
    /// The text is not JSON at all (the message is `serde_json`'s, with line and column).
    #[error("not valid JSON: {0}")]
    Syntax(String),
    /// The text nests objects and arrays deeper than [`MAX_JSON_DEPTH`].
    #[error("JSON nesting deeper than the limit of {MAX_JSON_DEPTH} (MAX_JSON_DEPTH) at {0:?}")]
    TooDeep(String),
    /// Valid JSON whose meaning would be changed by reading it: each problem has its pointer.
    #[error("{0}")]
    Inexact(Problems),
}

impl StrictJsonError {
    /// The error as validation problems (one for a syntax or depth error).
    pub fn into_problems(self) -> Problems {
        match self {
            StrictJsonError::Syntax(m) => {
                Problems(vec![Problem::new("", format!("invalid JSON: {m}"))])
            }
            StrictJsonError::TooDeep(at) => Problems(vec![Problem::new(
                at,
                format!("JSON nesting deeper than the limit of {MAX_JSON_DEPTH} (MAX_JSON_DEPTH)"),
            )]),
            StrictJsonError::Inexact(p) => p,
        }
    }
}

/// Parses `text` as JSON, refusing duplicate object keys, integer literals outside i64/u64,
/// non-zero literals that underflow to 0.0, literals that overflow to infinity, and nesting deeper
/// than [`MAX_JSON_DEPTH`].
pub fn parse_strict(text: &[u8]) -> Result<Value, StrictJsonError> {
    // The scanner runs first: it is bounded by the depth limit, so a hostile `[[[[...` is refused
    // before serde_json builds anything, and it names paths where serde_json names columns.
    let problems = scan(text)?;
    let value: Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        // A number that overflows is a syntax error to serde_json; the scanner said where.
        Err(_) if !problems.is_empty() => return Err(StrictJsonError::Inexact(Problems(problems))),
        Err(e) => return Err(StrictJsonError::Syntax(e.to_string())),
    };
    if problems.is_empty() {
        Ok(value)
    } else {
        Err(StrictJsonError::Inexact(Problems(problems)))
    }
}

/// One open object or array while scanning.
enum Frame {
    Object {
        /// Keys seen so far (decoded, so `"a"` and `"\u0061"` are the same key).
        keys: HashSet<String>,
        /// The member being read, for pointers.
        current: Option<String>,
        /// Whether the next string is a key.
        expect_key: bool,
    },
    Array {
        index: usize,
    },
}

fn path(stack: &[Frame]) -> String {
    pointer(stack.iter().map(|f| match f {
        Frame::Object { current, .. } => current.clone().unwrap_or_default(),
        Frame::Array { index } => index.to_string(),
    }))
}

/// Finds duplicate keys and inexact numbers. Tolerates invalid text (serde_json reports that);
/// every step consumes at least one byte, so it always ends.
fn scan(text: &[u8]) -> Result<Vec<Problem>, StrictJsonError> {
    let mut problems = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'{' | b'[' => {
                if stack.len() >= MAX_JSON_DEPTH {
                    return Err(StrictJsonError::TooDeep(path(&stack)));
                }
                stack.push(if text[i] == b'{' {
                    Frame::Object {
                        keys: HashSet::new(),
                        current: None,
                        expect_key: true,
                    }
                } else {
                    Frame::Array { index: 0 }
                });
                i += 1;
            }
            b'}' | b']' => {
                stack.pop();
                i += 1;
            }
            b',' => {
                match stack.last_mut() {
                    Some(Frame::Array { index }) => *index += 1,
                    Some(Frame::Object { expect_key, .. }) => *expect_key = true,
                    None => {}
                }
                i += 1;
            }
            b'"' => {
                let end = string_end(text, i);
                if let Some(Frame::Object {
                    keys,
                    current,
                    expect_key: expect_key @ true,
                }) = stack.last_mut()
                {
                    *expect_key = false;
                    let key: String = serde_json::from_slice(&text[i..end]).unwrap_or_default();
                    let duplicate = !keys.insert(key.clone());
                    *current = Some(key.clone());
                    if duplicate {
                        problems.push(Problem::new(
                            path(&stack),
                            format!("duplicate key {key:?}: each key may appear once in an object"),
                        ));
                    }
                }
                i = end;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < text.len()
                    && matches!(text[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                if let Some(why) = inexact_number(&text[start..i]) {
                    problems.push(Problem::new(path(&stack), why));
                }
            }
            _ => i += 1,
        }
    }
    Ok(problems)
}

/// The index just past the string starting at `start` (a `"`), or the end of the text.
fn string_end(text: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < text.len() {
        match text[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    text.len()
}

/// Why a number literal cannot be kept exactly, if it cannot.
fn inexact_number(literal: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(literal).ok()?;
    let is_integer = !s.contains(['.', 'e', 'E']);
    if is_integer {
        if s.parse::<i64>().is_ok() || s.parse::<u64>().is_ok() || s.len() <= 1 {
            return None;
        }
        return Some(format!(
            "integer {s} is outside the 64-bit range ({} to {}) and cannot be kept exactly",
            i64::MIN,
            u64::MAX
        ));
    }
    let f: f64 = s.parse().ok()?;
    if f.is_infinite() {
        return Some(format!("number {s} is too large for a 64-bit float"));
    }
    let mantissa = s.split(['e', 'E']).next().unwrap_or_default();
    if f == 0.0 && mantissa.bytes().any(|b| matches!(b, b'1'..=b'9')) {
        return Some(format!(
            "number {s} is too small for a 64-bit float (it would be read as 0)"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems(text: &str) -> Vec<(String, String)> {
        match parse_strict(text.as_bytes()) {
            Err(StrictJsonError::Inexact(p)) => {
                p.0.into_iter().map(|p| (p.pointer, p.message)).collect()
            }
            other => panic!("expected problems for {text}, got {other:?}"),
        }
    }

    #[test]
    fn ordinary_json_reads_as_serde_json_reads_it() {
        let text = r#"{"a": [1, -2, 3.5, 1e10, 18446744073709551615, -9223372036854775808, 0.0, -0, 0e-999],
                       "b": {"c": "x\"y", "d": null, "e": true}, "s": "1e-400 {\"a\":1}"}"#;
        let strict = parse_strict(text.as_bytes()).unwrap();
        let loose: Value = serde_json::from_str(text).unwrap();
        assert_eq!(strict, loose);
        assert_eq!(parse_strict(b"3").unwrap(), json!(3));
    }

    #[test]
    fn duplicate_keys_are_refused_with_their_path() {
        let p = problems(r#"{"flags": {"f": {"state": "ENABLED", "state": "DISABLED"}}}"#);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, "/flags/f/state");
        assert!(p[0].1.contains("duplicate key"), "{}", p[0].1);
        // An escape spelling the same key is the same key.
        assert_eq!(problems(r#"{"a": 1, "\u0061": 2}"#)[0].0, "/a");
        // The same key in sibling objects is fine.
        assert!(parse_strict(br#"[{"a": 1}, {"a": 2}]"#).is_ok());
    }

    #[test]
    fn numbers_that_would_change_are_refused_with_their_path() {
        let p = problems(r#"{"v": [0, 18446744073709551617]}"#);
        assert_eq!(p[0].0, "/v/1");
        assert!(p[0].1.contains("64-bit range"), "{}", p[0].1);
        assert_eq!(problems(r#"{"v": -9223372036854775809}"#)[0].0, "/v");
        let p = problems(r#"{"x": {"y~/z": 1e-400}}"#);
        assert_eq!(p[0].0, "/x/y~0~1z");
        assert!(p[0].1.contains("too small"), "{}", p[0].1);
        let p = problems(r#"{"big": 1e400}"#);
        assert_eq!(p[0].0, "/big");
        assert!(p[0].1.contains("too large"), "{}", p[0].1);
    }

    #[test]
    fn nesting_past_the_limit_is_refused_before_parsing() {
        let ok = format!(
            "{}{}",
            "[".repeat(MAX_JSON_DEPTH),
            "]".repeat(MAX_JSON_DEPTH)
        );
        assert!(parse_strict(ok.as_bytes()).is_ok());
        let deep = "[".repeat(1_000_000);
        assert!(matches!(
            parse_strict(deep.as_bytes()),
            Err(StrictJsonError::TooDeep(_))
        ));
    }

    #[test]
    fn text_that_is_not_json_is_a_syntax_error_and_never_a_panic() {
        for bad in [
            "", "{", "{\"a\"", "[1,", "\"\\", "{\"a\":}", "-", "1e", "[-]",
        ] {
            assert!(parse_strict(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(matches!(
            parse_strict(b"{nope}"),
            Err(StrictJsonError::Syntax(_))
        ));
    }
}
