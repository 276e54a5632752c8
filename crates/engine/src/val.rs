//! Values met while evaluating a rule, and JsonLogic's (that is, JavaScript's) coercions on them:
//! truthiness, `==`, `===`, `<`, ToNumber, parseFloat and String().

use std::rc::Rc;

use serde_json::{Number, Value};

/// Deepest array nesting String() follows; deeper parts render as empty, so a hostile context
/// cannot exhaust the stack.
const MAX_STRINGIFY_DEPTH: usize = 64;

/// A value produced while evaluating a rule. It borrows from the compiled rule and from the
/// evaluation context where it can, so the common comparisons allocate nothing.
#[derive(Debug, Clone)]
pub(crate) enum Val<'a> {
    Null,
    Bool(bool),
    Num(f64),
    Str(&'a str),
    String(String),
    /// An array or object borrowed from the rule or the context.
    Json(&'a Value),
    /// An array built during evaluation (`map`, `merge`, literal arrays with logic inside);
    /// shared, so reading it from a scope (`var` in `map`, the accumulator of `reduce`) is a
    /// reference count, not a copy.
    Array(Rc<Vec<Val<'a>>>),
    /// An object or array built during evaluation (the whole data object, `$flagd`).
    Owned(Rc<Value>),
}

/// String equality for the short keys and values rules compare: up to 16 bytes compared as two
/// overlapping words, where a call to `memcmp` or a byte loop costs more than the comparison.
#[inline]
pub(crate) fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        0 => true,
        // Bytes 0, n/2 and n-1 cover every byte of a string this short.
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => word4(a, 0) == word4(b, 0) && word4(a, n - 4) == word4(b, n - 4),
        8..=16 => word8(a, 0) == word8(b, 0) && word8(a, n - 8) == word8(b, n - 8),
        _ => a == b,
    }
}

#[inline(always)]
fn word4(s: &[u8], at: usize) -> u32 {
    let mut w = [0; 4];
    w.copy_from_slice(&s[at..at + 4]);
    u32::from_ne_bytes(w)
}

#[inline(always)]
fn word8(s: &[u8], at: usize) -> u64 {
    let mut w = [0; 8];
    w.copy_from_slice(&s[at..at + 8]);
    u64::from_ne_bytes(w)
}

/// A value as JavaScript's ToPrimitive leaves it.
enum Prim<'v> {
    Null,
    Bool(bool),
    Num(f64),
    Str(std::borrow::Cow<'v, str>),
}

impl<'a> Val<'a> {
    /// A borrowed JSON value.
    pub(crate) fn from_json(v: &'a Value) -> Val<'a> {
        match v {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(*b),
            Value::Number(n) => Val::Num(n.as_f64().unwrap_or(f64::NAN)),
            Value::String(s) => Val::Str(s),
            Value::Array(_) | Value::Object(_) => Val::Json(v),
        }
    }

    /// An owned JSON value (one not borrowed from the rule or the context).
    pub(crate) fn from_owned_json(v: Value) -> Val<'a> {
        match v {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(b),
            Value::Number(n) => Val::Num(n.as_f64().unwrap_or(f64::NAN)),
            Value::String(s) => Val::String(s),
            other => Val::Owned(Rc::new(other)),
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Val::Str(s) => Some(s),
            Val::String(s) => Some(s),
            _ => None,
        }
    }

    /// Elements when this is an array.
    pub(crate) fn array_items(&self) -> Option<Vec<Val<'a>>> {
        match self {
            Val::Json(Value::Array(a)) => Some(a.iter().map(Val::from_json).collect()),
            Val::Array(a) => Some(a.to_vec()),
            Val::Owned(v) => match &**v {
                Value::Array(a) => Some(a.iter().cloned().map(Val::from_owned_json).collect()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Length when this is an array.
    pub(crate) fn array_len(&self) -> Option<usize> {
        match self {
            Val::Json(Value::Array(a)) => Some(a.len()),
            Val::Array(a) => Some(a.len()),
            Val::Owned(v) => v.as_array().map(Vec::len),
            _ => None,
        }
    }

    pub(crate) fn is_object_like(&self) -> bool {
        matches!(self, Val::Json(_) | Val::Array(_) | Val::Owned(_))
    }

    /// JsonLogic truthiness: JavaScript's, except that an empty array is falsy.
    pub(crate) fn truthy(&self) -> bool {
        match self {
            Val::Null => false,
            Val::Bool(b) => *b,
            Val::Num(n) => *n != 0.0 && !n.is_nan(),
            Val::Str(s) => !s.is_empty(),
            Val::String(s) => !s.is_empty(),
            other => other.array_len() != Some(0),
        }
    }

    /// JavaScript's ToNumber.
    pub(crate) fn to_number(&self) -> f64 {
        match self.to_primitive() {
            Prim::Null => 0.0,
            Prim::Bool(b) => f64::from(u8::from(b)),
            Prim::Num(n) => n,
            Prim::Str(s) => string_to_number(&s),
        }
    }

    /// JavaScript's `parseFloat(String(v))`, which JsonLogic's `+` and `*` use.
    pub(crate) fn parse_float(&self) -> f64 {
        match self {
            Val::Num(n) => *n,
            Val::Str(s) => parse_float(s),
            Val::String(s) => parse_float(s),
            Val::Null | Val::Bool(_) => f64::NAN,
            other => parse_float(&other.to_js_string()),
        }
    }

    /// JavaScript's String(v).
    pub(crate) fn to_js_string(&self) -> String {
        let mut out = String::new();
        self.write_js_string(&mut out);
        out
    }

    pub(crate) fn write_js_string(&self, out: &mut String) {
        match self {
            Val::Null => out.push_str("null"),
            Val::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Val::Num(n) => write_number(*n, out),
            Val::Str(s) => out.push_str(s),
            Val::String(s) => out.push_str(s),
            Val::Json(v) => write_json_js_string(v, out, 0),
            Val::Owned(v) => write_json_js_string(v, out, 0),
            Val::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    // Array.prototype.join renders null as empty.
                    match item {
                        Val::Null => {}
                        Val::Array(_) | Val::Json(_) | Val::Owned(_) => {
                            write_nested_val(item, out, 1)
                        }
                        other => other.write_js_string(out),
                    }
                }
            }
        }
    }

    fn to_primitive(&self) -> Prim<'_> {
        match self {
            Val::Null => Prim::Null,
            Val::Bool(b) => Prim::Bool(*b),
            Val::Num(n) => Prim::Num(*n),
            Val::Str(s) => Prim::Str((*s).into()),
            Val::String(s) => Prim::Str(s.as_str().into()),
            other => Prim::Str(other.to_js_string().into()),
        }
    }

    /// JavaScript's `==`. Arrays and objects are never equal to each other (JavaScript compares
    /// them by identity, and every value here is a fresh one).
    pub(crate) fn loose_eq(&self, other: &Val<'_>) -> bool {
        match (self, other) {
            (Val::Str(a), Val::Str(b)) => str_eq(a, b),
            (Val::Num(a), Val::Num(b)) => a == b,
            (Val::Null, Val::Null) => true,
            (Val::Null, _) | (_, Val::Null) => false,
            (a, b) if a.is_object_like() && b.is_object_like() => false,
            (Val::Bool(b), o) => Val::Num(f64::from(u8::from(*b))).loose_eq(o),
            (o, Val::Bool(b)) => o.loose_eq(&Val::Num(f64::from(u8::from(*b)))),
            (a, b) => match (a.to_primitive(), b.to_primitive()) {
                (Prim::Str(x), Prim::Str(y)) => x == y,
                (Prim::Num(n), Prim::Str(s)) | (Prim::Str(s), Prim::Num(n)) => {
                    n == string_to_number(&s)
                }
                _ => false,
            },
        }
    }

    /// JavaScript's `===`.
    pub(crate) fn strict_eq(&self, other: &Val<'_>) -> bool {
        match (self, other) {
            (Val::Null, Val::Null) => true,
            (Val::Bool(a), Val::Bool(b)) => a == b,
            (Val::Num(a), Val::Num(b)) => a == b,
            (a, b) => match (a.as_str(), b.as_str()) {
                (Some(x), Some(y)) => str_eq(x, y),
                _ => false,
            },
        }
    }

    /// JavaScript's abstract relational comparison `self < other`: `None` when either side is
    /// NaN after coercion (every comparison with it is false).
    pub(crate) fn less_than(&self, other: &Val<'_>) -> Option<bool> {
        match (self, other) {
            (Val::Num(a), Val::Num(b)) => (!a.is_nan() && !b.is_nan()).then_some(a < b),
            (Val::Str(a), Val::Str(b)) => Some(a < b),
            _ => {
                let (pa, pb) = (self.to_primitive(), other.to_primitive());
                if let (Prim::Str(a), Prim::Str(b)) = (&pa, &pb) {
                    return Some(a < b);
                }
                let (a, b) = (prim_number(&pa), prim_number(&pb));
                (!a.is_nan() && !b.is_nan()).then_some(a < b)
            }
        }
    }

    /// The value as JSON (NaN and infinities become null, as JSON.stringify makes them).
    pub(crate) fn to_value(&self) -> Value {
        match self {
            Val::Null => Value::Null,
            Val::Bool(b) => Value::Bool(*b),
            Val::Num(n) => number_value(*n),
            Val::Str(s) => Value::String((*s).to_owned()),
            Val::String(s) => Value::String(s.clone()),
            Val::Json(v) => (*v).clone(),
            Val::Owned(v) => (**v).clone(),
            Val::Array(items) => Value::Array(items.iter().map(Val::to_value).collect()),
        }
    }

    /// The variant key a targeting result names: a string as it is, booleans as `true`/`false`,
    /// anything else by [`Val::variant_name`]; `None` for null (the default variant).
    pub(crate) fn variant_key(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some(match self {
            Val::Null => return None,
            Val::Str(s) => (*s).into(),
            Val::String(s) => s.as_str().into(),
            Val::Bool(true) => "true".into(),
            Val::Bool(false) => "false".into(),
            other => other.variant_name().into(),
        })
    }

    /// The variant key a targeting result names, as flagd derives it: the result's JSON text with
    /// double quotes removed.
    pub(crate) fn variant_name(&self) -> String {
        match self {
            Val::Str(s) => s.replace('"', ""),
            Val::String(s) => s.replace('"', ""),
            Val::Num(n) => {
                let mut out = String::new();
                write_number(*n, &mut out);
                out
            }
            other => other.to_value().to_string().replace('"', ""),
        }
    }
}

/// At most how many bytes String(v) writes, or `None` when that is more than `cap`: what the
/// evaluation budget is charged before a value is turned into text. Stops counting once past
/// `cap`, so weighing a huge value costs no more than the budget it would exceed.
pub(crate) fn js_len_within(v: &Val<'_>, cap: usize) -> Option<usize> {
    let mut total = 0usize;
    weigh_val_text(v, cap, 0, &mut total).then_some(total)
}

/// How much memory a copy of `v` as JSON takes, at most: [`VALUE_BYTES`] a value plus the bytes
/// of its strings; `None` when more than `cap`.
pub(crate) fn copy_weight_within(v: &Val<'_>, cap: usize) -> Option<usize> {
    let mut total = 0usize;
    let ok = match v {
        Val::Json(j) => weigh_json_copy(j, cap, &mut total),
        Val::Owned(j) => weigh_json_copy(j, cap, &mut total),
        Val::Array(items) => {
            total = VALUE_BYTES;
            items.iter().all(|i| {
                copy_weight_within(i, cap.saturating_sub(total)).is_some_and(|w| {
                    total = total.saturating_add(w);
                    total <= cap
                })
            })
        }
        Val::String(s) => {
            total = VALUE_BYTES + s.len();
            total <= cap
        }
        _ => {
            total = VALUE_BYTES;
            total <= cap
        }
    };
    ok.then_some(total)
}

/// Bytes charged for each value an operation builds or copies (a `Val` or a JSON value).
pub(crate) const VALUE_BYTES: usize = bunting_model::limits::BUDGET_VALUE_BYTES as usize;

fn weigh_json_copy(v: &Value, cap: usize, total: &mut usize) -> bool {
    *total = total.saturating_add(VALUE_BYTES);
    if *total > cap {
        return false;
    }
    match v {
        Value::String(s) => {
            *total = total.saturating_add(s.len());
            *total <= cap
        }
        Value::Array(items) => items.iter().all(|i| weigh_json_copy(i, cap, total)),
        Value::Object(m) => m.iter().all(|(k, i)| {
            *total = total.saturating_add(k.len());
            weigh_json_copy(i, cap, total)
        }),
        _ => true,
    }
}

/// Longest text a number can take in String() ("-1.7976931348623157e+308" and the like).
const NUMBER_TEXT_BYTES: usize = 25;

fn weigh_val_text(v: &Val<'_>, cap: usize, depth: usize, total: &mut usize) -> bool {
    let add = |total: &mut usize, n: usize| {
        *total = total.saturating_add(n);
        *total <= cap
    };
    match v {
        Val::Null => add(total, 4),
        Val::Bool(_) => add(total, 5),
        Val::Num(_) => add(total, NUMBER_TEXT_BYTES),
        Val::Str(s) => add(total, s.len()),
        Val::String(s) => add(total, s.len()),
        Val::Json(j) => weigh_json_text(j, cap, depth, total),
        Val::Owned(j) => weigh_json_text(j, cap, depth, total),
        Val::Array(_) if depth >= MAX_STRINGIFY_DEPTH => true,
        Val::Array(items) => items
            .iter()
            .all(|i| add(total, 1) && weigh_val_text(i, cap, depth + 1, total)),
    }
}

fn weigh_json_text(v: &Value, cap: usize, depth: usize, total: &mut usize) -> bool {
    let add = |total: &mut usize, n: usize| {
        *total = total.saturating_add(n);
        *total <= cap
    };
    match v {
        Value::Null => add(total, 4),
        Value::Bool(_) => add(total, 5),
        Value::Number(_) => add(total, NUMBER_TEXT_BYTES),
        Value::String(s) => add(total, s.len()),
        Value::Object(_) => add(total, "[object Object]".len()),
        Value::Array(_) if depth >= MAX_STRINGIFY_DEPTH => true,
        Value::Array(items) => items
            .iter()
            .all(|i| add(total, 1) && weigh_json_text(i, cap, depth + 1, total)),
    }
}

fn prim_number(p: &Prim<'_>) -> f64 {
    match p {
        Prim::Null => 0.0,
        Prim::Bool(b) => f64::from(u8::from(*b)),
        Prim::Num(n) => *n,
        Prim::Str(s) => string_to_number(s),
    }
}

/// Looks `key` up in an object, or as a canonical index in an array (as JavaScript's `data[key]`).
pub(crate) fn lookup_json<'v>(v: &'v Value, key: &str) -> Option<&'v Value> {
    match v {
        Value::Object(m) => m.get(key),
        Value::Array(a) => canonical_index(key).and_then(|i| a.get(i)),
        _ => None,
    }
}

/// `"3"` → 3; `"03"`, `"-1"`, `"x"` → None (JavaScript treats only canonical numerals as indexes).
pub(crate) fn canonical_index(key: &str) -> Option<usize> {
    let i: usize = key.parse().ok()?;
    (key.len() == 1 || !key.starts_with('0')).then_some(i)
}

fn write_nested_val(v: &Val<'_>, out: &mut String, depth: usize) {
    match v {
        Val::Json(j) => write_json_js_string(j, out, depth),
        Val::Owned(j) => write_json_js_string(j, out, depth),
        Val::Array(items) if depth < MAX_STRINGIFY_DEPTH => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match item {
                    Val::Null => {}
                    other => write_nested_val(other, out, depth + 1),
                }
            }
        }
        Val::Array(_) => {}
        other => other.write_js_string(out),
    }
}

fn write_json_js_string(v: &Value, out: &mut String, depth: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(n.as_f64().unwrap_or(f64::NAN), out),
        Value::String(s) => out.push_str(s),
        Value::Object(_) => out.push_str("[object Object]"),
        Value::Array(_) if depth >= MAX_STRINGIFY_DEPTH => {}
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                if !item.is_null() {
                    write_json_js_string(item, out, depth + 1);
                }
            }
        }
    }
}

/// A JSON number for `n`: integral values as integers (as JSON.stringify writes them), NaN and
/// infinities as null.
pub(crate) fn number_value(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        // Exact: the integer is below 2^53.
        Value::Number(Number::from(n as i64))
    } else {
        Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

/// JavaScript's Number.prototype.toString() for `n`.
pub(crate) fn write_number(n: f64, out: &mut String) {
    use std::fmt::Write;
    if n.is_nan() {
        out.push_str("NaN");
    } else if n.is_infinite() {
        out.push_str(if n > 0.0 { "Infinity" } else { "-Infinity" });
    } else if n == 0.0 {
        out.push('0');
    } else {
        let abs = n.abs();
        if (1e-6..1e21).contains(&abs) {
            // Rust's Display prints the shortest round-trip digits without an exponent, as
            // JavaScript does in this range.
            let _ = write!(out, "{n}");
        } else {
            let s = format!("{n:e}");
            match s.split_once('e') {
                Some((mantissa, exp)) if !exp.starts_with('-') => {
                    let _ = write!(out, "{mantissa}e+{exp}");
                }
                _ => out.push_str(&s),
            }
        }
    }
}

fn is_js_whitespace(c: char) -> bool {
    c.is_whitespace() || c == '\u{feff}'
}

/// JavaScript's StringToNumber: whole string, trimmed; `""` is 0; hex/octal/binary literals;
/// `Infinity`; anything else unparsable is NaN.
pub(crate) fn string_to_number(s: &str) -> f64 {
    let t = s.trim_matches(is_js_whitespace);
    if t.is_empty() {
        return 0.0;
    }
    for (prefix, radix) in [
        ("0x", 16),
        ("0X", 16),
        ("0o", 8),
        ("0O", 8),
        ("0b", 2),
        ("0B", 2),
    ] {
        if let Some(digits) = t.strip_prefix(prefix) {
            if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
                return f64::NAN;
            }
            return digits.chars().fold(0.0, |acc, c| {
                acc * f64::from(radix) + f64::from(c.to_digit(radix).unwrap_or(0))
            });
        }
    }
    match decimal_prefix(t) {
        Some((n, len)) if len == t.len() => n,
        _ => f64::NAN,
    }
}

/// JavaScript's parseFloat: the longest decimal prefix after leading whitespace, or NaN.
pub(crate) fn parse_float(s: &str) -> f64 {
    let t = s.trim_start_matches(is_js_whitespace);
    decimal_prefix(t).map_or(f64::NAN, |(n, _)| n)
}

/// The longest prefix of `t` that is a JavaScript StrDecimalLiteral, with its value and length.
fn decimal_prefix(t: &str) -> Option<(f64, usize)> {
    let b = t.as_bytes();
    let mut i = 0;
    let negative = match b.first() {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    if t[i..].starts_with("Infinity") {
        let v = if negative {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        };
        return Some((v, i + "Infinity".len()));
    }
    let digits_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = i - digits_start;
    let mut frac_digits = 0;
    if i < b.len() && b[i] == b'.' {
        let mut j = i + 1;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        frac_digits = j - i - 1;
        if int_digits > 0 || frac_digits > 0 {
            i = j;
        }
    }
    if int_digits == 0 && frac_digits == 0 {
        return None;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        let mut j = i + 1;
        if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
            j += 1;
        }
        let exp_start = j;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if j > exp_start {
            i = j;
        }
    }
    // The prefix is a valid Rust float literal too ("1.", ".5", "1e5" all parse).
    let v: f64 = t[..i].parse().ok()?;
    Some((v, i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn num(s: &str) -> f64 {
        string_to_number(s)
    }

    #[test]
    fn string_to_number_follows_javascript() {
        assert_eq!(num(""), 0.0);
        assert_eq!(num("  12 "), 12.0);
        assert_eq!(num("1e3"), 1000.0);
        assert_eq!(num(".5"), 0.5);
        assert_eq!(num("5."), 5.0);
        assert_eq!(num("0x1F"), 31.0);
        assert_eq!(num("-Infinity"), f64::NEG_INFINITY);
        for nan in ["abc", "1,2", "12px", "inf", "nan", ".", "-0x1", "1e"] {
            assert!(num(nan).is_nan(), "{nan}");
        }
    }

    #[test]
    fn parse_float_takes_the_longest_prefix() {
        assert_eq!(parse_float("12px"), 12.0);
        assert_eq!(parse_float(" -3.5e2x"), -350.0);
        assert_eq!(parse_float("1e"), 1.0);
        assert!(parse_float("px").is_nan());
        assert!(parse_float("").is_nan());
    }

    #[test]
    fn numbers_print_as_javascript_prints_them() {
        let s = |n: f64| {
            let mut o = String::new();
            write_number(n, &mut o);
            o
        };
        assert_eq!(s(1.0), "1");
        assert_eq!(s(-0.0), "0");
        assert_eq!(s(1.5), "1.5");
        assert_eq!(s(1e21), "1e+21");
        assert_eq!(s(1.5e-7), "1.5e-7");
        assert_eq!(s(123456789012.0), "123456789012");
        assert_eq!(s(f64::NAN), "NaN");
    }

    #[test]
    fn loose_equality_coerces_like_javascript() {
        let j1 = json!([1]);
        let j12 = json!([1, 2]);
        assert!(Val::Num(1.0).loose_eq(&Val::Str("1")));
        assert!(Val::Bool(true).loose_eq(&Val::Num(1.0)));
        assert!(Val::Bool(true).loose_eq(&Val::Str("1")));
        assert!(Val::Str("").loose_eq(&Val::Num(0.0)));
        assert!(!Val::Null.loose_eq(&Val::Num(0.0)));
        assert!(Val::Null.loose_eq(&Val::Null));
        assert!(Val::Json(&j1).loose_eq(&Val::Num(1.0)));
        assert!(Val::Json(&j12).loose_eq(&Val::Str("1,2")));
        assert!(!Val::Json(&j1).loose_eq(&Val::Json(&j1)));
        assert!(!Val::Str("a").loose_eq(&Val::Str("b")));
    }

    #[test]
    fn strict_equality_needs_one_type() {
        assert!(!Val::Num(1.0).strict_eq(&Val::Str("1")));
        assert!(Val::String("x".into()).strict_eq(&Val::Str("x")));
        assert!(!Val::Num(f64::NAN).strict_eq(&Val::Num(f64::NAN)));
    }

    #[test]
    fn relational_comparison_uses_strings_only_when_both_are_strings() {
        assert_eq!(Val::Str("11").less_than(&Val::Str("2")), Some(true));
        assert_eq!(Val::Str("11").less_than(&Val::Num(2.0)), Some(false));
        assert_eq!(Val::Null.less_than(&Val::Num(1.0)), Some(true));
        assert_eq!(Val::Str("a").less_than(&Val::Num(1.0)), None);
    }

    #[test]
    fn truthiness_treats_empty_array_as_false_and_objects_as_true() {
        let empty = json!([]);
        let obj = json!({});
        assert!(!Val::Json(&empty).truthy());
        assert!(Val::Json(&obj).truthy());
        assert!(!Val::Str("").truthy());
        assert!(Val::Str("0").truthy());
        assert!(!Val::Num(f64::NAN).truthy());
    }

    proptest::proptest! {
        #[test]
        fn word_wise_string_equality_equals_byte_equality(
            a in "[ab\\x{e9}]{0,20}",
            flip in 0usize..20,
        ) {
            // Same-length pairs that differ in one byte, and equal pairs, of every short length.
            let b: String = a
                .chars()
                .enumerate()
                .map(|(i, c)| if i == flip && c == 'a' { 'b' } else { c })
                .collect();
            proptest::prop_assert_eq!(str_eq(&a, &b), a == b);
            proptest::prop_assert!(str_eq(&a, &a.clone()));
            proptest::prop_assert_eq!(str_eq(&a, "abab"), a == "abab");
        }
    }

    #[test]
    fn string_conversion_joins_arrays_and_blanks_nulls() {
        let v = json!([1, null, [2, [3]], {"a": 1}, "x"]);
        assert_eq!(Val::Json(&v).to_js_string(), "1,,2,3,[object Object],x");
    }
}
