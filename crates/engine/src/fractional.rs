//! flagd's `fractional` operation: deterministic percentage splits by murmur3 hash.
//!
//! Derived from flagd's specification and evaluator: each distribution is `[variant, weight?]`
//! (variant a string, boolean, number or null; weight an integer, 1 when left out or null,
//! negative weights clamped to 0, each and their sum at most `i32::MAX`); anything else makes the
//! operation answer null. The bucketing string is hashed with murmur3_x86_32 (seed 0) over its
//! UTF-8 bytes.

use serde_json::Value;

use crate::compiled::FractionalBucketing;
use crate::val::Val;

/// Largest weight, and largest sum of weights, flagd accepts.
pub(crate) const MAX_WEIGHT_SUM: u64 = i32::MAX as u64;

/// The string a user is bucketed by.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BucketKey<'k> {
    /// The value of the rule's bucketing expression.
    Given(&'k str),
    /// flagd's default: the flag key followed by the targeting key (hashed without building the
    /// concatenation).
    FlagAndTargeting(&'k str, &'k str),
}

impl BucketKey<'_> {
    pub(crate) fn hash(&self) -> u32 {
        match *self {
            BucketKey::Given(s) => murmur3_x86_32(s.as_bytes(), &[]),
            BucketKey::FlagAndTargeting(f, t) => murmur3_x86_32(f.as_bytes(), t.as_bytes()),
        }
    }
}

/// murmur3_x86_32 with seed 0 of `a` followed by `b`, without joining them. Written out here
/// rather than through a streaming hasher: the keys are short, and a streaming hasher's
/// buffering costs more than the hashing itself.
pub(crate) fn murmur3_x86_32(a: &[u8], b: &[u8]) -> u32 {
    let len = a.len() + b.len();
    let (mut h, a_rest) = blocks(0, a);
    // The block that straddles the two slices, put together from both.
    let b = if a_rest.is_empty() {
        b
    } else {
        match b.split_at_checked(4 - a_rest.len()) {
            Some((b_head, b_rest)) => {
                h = round(h, word(a_rest) | word(b_head) << (8 * a_rest.len()));
                b_rest
            }
            // Fewer than four bytes remain in all: they are the tail.
            None => {
                let tail = word(a_rest) | word(b) << (8 * a_rest.len());
                return finish(h, tail, len);
            }
        }
    };
    let (h, b_rest) = blocks(h, b);
    finish(h, word(b_rest), len)
}

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// A little-endian word of up to four bytes.
#[inline(always)]
fn word(bytes: &[u8]) -> u32 {
    match *bytes {
        [] => 0,
        [x] => u32::from(x),
        [x, y] => u32::from(x) | u32::from(y) << 8,
        [x, y, z] => u32::from(x) | u32::from(y) << 8 | u32::from(z) << 16,
        [x, y, z, w, ..] => u32::from_le_bytes([x, y, z, w]),
    }
}

#[inline(always)]
fn scramble(k: u32) -> u32 {
    k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2)
}

#[inline(always)]
fn round(h: u32, k: u32) -> u32 {
    (h ^ scramble(k))
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// Hashes the whole 4-byte blocks of `bytes`; returns the hash and the bytes left over.
#[inline(always)]
fn blocks(mut h: u32, mut bytes: &[u8]) -> (u32, &[u8]) {
    while let [x, y, z, w, rest @ ..] = bytes {
        h = round(h, u32::from_le_bytes([*x, *y, *z, *w]));
        bytes = rest;
    }
    (h, bytes)
}

/// Mixes in the tail (fewer than four bytes; scrambling 0 changes nothing when there is none)
/// and the length, then avalanches.
#[inline(always)]
fn finish(h: u32, tail: u32, len: usize) -> u32 {
    // The algorithm mixes the length modulo 2^32.
    let mut h = (h ^ scramble(tail)) ^ len as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Parsed distributions: variants with their weights.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Distribution {
    variants: Vec<Value>,
    weights: Vec<u32>,
    /// Running sums of `weights`: variant i takes the v2 buckets below `ends[i]`.
    ends: Vec<u64>,
    total: u64,
}

impl Distribution {
    /// Parses evaluated distribution arguments as flagd does; `None` when any is invalid (the
    /// operation then answers null). At least one distribution is required.
    pub(crate) fn parse(args: &[Val<'_>]) -> Option<Distribution> {
        if args.is_empty() {
            return None;
        }
        let mut variants = Vec::with_capacity(args.len());
        let mut weights = Vec::with_capacity(args.len());
        let mut total = 0u64;
        for arg in args {
            let items = arg.array_items()?;
            let variant = match items.first()? {
                v @ (Val::Str(_) | Val::String(_) | Val::Bool(_) | Val::Num(_) | Val::Null) => {
                    v.to_value()
                }
                _ => return None,
            };
            let weight = match items.get(1) {
                None | Some(Val::Null) => 1,
                Some(Val::Num(w)) => {
                    if w.fract() != 0.0 || w.is_nan() {
                        return None;
                    }
                    if *w > MAX_WEIGHT_SUM as f64 {
                        return None;
                    }
                    // Negative weights come out of rollout arithmetic; flagd clamps them.
                    if *w < 0.0 {
                        0
                    } else {
                        *w as u32
                    }
                }
                Some(_) => return None,
            };
            total += u64::from(weight);
            variants.push(variant);
            weights.push(weight);
        }
        if total > MAX_WEIGHT_SUM {
            return None;
        }
        let ends = weights
            .iter()
            .scan(0u64, |end, &w| {
                *end += u64::from(w);
                Some(*end)
            })
            .collect();
        Some(Distribution {
            variants,
            weights,
            ends,
            total,
        })
    }

    /// The variant `key` falls into; null when every weight is 0.
    pub(crate) fn choose(&self, key: &BucketKey<'_>, bucketing: FractionalBucketing) -> Val<'_> {
        match self.pick(key, bucketing) {
            Pick::Variant(i) => self.variants.get(i).map_or(Val::Null, Val::from_json),
            Pick::NoWeight => Val::Null,
            // v1 only: a hash of i32::MIN lands past 100%, where flagd's old code answered "".
            Pick::PastEnd => Val::Str(""),
        }
    }

    /// The position of the variant `key` falls into.
    pub(crate) fn pick(&self, key: &BucketKey<'_>, bucketing: FractionalBucketing) -> Pick {
        if self.total == 0 {
            return Pick::NoWeight;
        }
        let hash = key.hash();
        let index = match bucketing {
            FractionalBucketing::V2 => {
                let bucket = bucket_v2(hash, self.total);
                self.ends.iter().position(|&end| bucket < end)
            }
            FractionalBucketing::V1 => {
                let bucket = bucket_v1(hash);
                let mut end = 0f64;
                let total = self.total as f64;
                self.weights.iter().position(|&w| {
                    end += 100.0 * f64::from(w) / total;
                    bucket < end
                })
            }
        };
        index.map_or(Pick::PastEnd, Pick::Variant)
    }

    /// The variants, in the order of the distribution.
    pub(crate) fn variants(&self) -> &[Value] {
        &self.variants
    }
}

/// Where a bucketing key falls in a distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pick {
    /// The variant at this position.
    Variant(usize),
    /// Every weight is 0: the operation answers null.
    NoWeight,
    /// Past the last variant (v1 only, for a hash of `i32::MIN`): flagd's old code answered "".
    PastEnd,
}

/// flagd's current ("v2") bucket: the hash scaled to `[0, total)` in exact integer arithmetic.
pub(crate) fn bucket_v2(hash: u32, total: u64) -> u64 {
    (u64::from(hash) * total) >> 32
}

/// flagd's earlier ("v1") bucket: `|i32(hash)| / i32::MAX` as a percentage in `[0, 100]`.
pub(crate) fn bucket_v1(hash: u32) -> f64 {
    let signed = hash as i32;
    (f64::from(signed).abs() / f64::from(i32::MAX)) * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str, seed: u32) -> u32 {
        murmur3::murmur3_32(&mut std::io::Cursor::new(s.as_bytes()), seed).unwrap()
    }

    #[test]
    fn murmur3_matches_published_x86_32_vectors() {
        // Vectors from the reference implementation's commonly cited test list (SMHasher),
        // checked on the hash the engine uses and on an independent implementation.
        let vectors: [(&str, u32, u32); 7] = [
            ("", 0, 0),
            ("", 1, 0x514E_28B7),
            ("", 0xffff_ffff, 0x81F1_6F39),
            ("\0\0\0\0", 0, 0x2362_F9DE),
            ("aaaa", 0x9747_b28c, 0x5A97_808A),
            ("Hello, world!", 0x9747_b28c, 0x2488_4CBA),
            (
                "The quick brown fox jumps over the lazy dog",
                0x9747_b28c,
                0x2FA8_26CD,
            ),
        ];
        for (text, seed, want) in vectors {
            assert_eq!(h(text, seed), want, "{text:?}");
            assert_eq!(
                mur3::murmurhash3_x86_32(text.as_bytes(), seed),
                want,
                "{text:?}"
            );
            if seed == 0 {
                assert_eq!(murmur3_x86_32(text.as_bytes(), &[]), want, "{text:?}");
            }
        }
    }

    use proptest::prop_oneof;

    proptest::proptest! {
        #[test]
        fn two_slice_hash_equals_the_hash_of_the_joined_string(
            flag in prop_oneof!["[a-z0-9-]{0,40}", "\\PC{0,40}"],
            targeting in prop_oneof!["[a-z0-9-]{0,40}", "\\PC{0,40}"],
        ) {
            let joined = format!("{flag}{targeting}");
            proptest::prop_assert_eq!(
                BucketKey::FlagAndTargeting(&flag, &targeting).hash(),
                h(&joined, 0)
            );
            proptest::prop_assert_eq!(BucketKey::Given(&joined).hash(), h(&joined, 0));
        }
    }

    #[test]
    fn two_slice_hash_is_the_same_at_every_split() {
        let text = "The quick brown fox jumps over the lazy dog";
        for len in 0..=text.len() {
            let whole = &text.as_bytes()[..len];
            for at in 0..=len {
                let (a, b) = whole.split_at(at);
                assert_eq!(
                    murmur3_x86_32(a, b),
                    mur3::murmurhash3_x86_32(whole, 0),
                    "{len} {at}"
                );
            }
        }
    }

    #[test]
    fn default_bucket_key_hashes_the_concatenation() {
        for (f, t) in [
            ("headerColor", "foo@foo.com"),
            ("", "abc"),
            ("abc", ""),
            ("a", "bcdefgh"),
        ] {
            let joined = format!("{f}{t}");
            assert_eq!(
                BucketKey::FlagAndTargeting(f, t).hash(),
                h(&joined, 0),
                "{joined}"
            );
            assert_eq!(BucketKey::Given(&joined).hash(), h(&joined, 0), "{joined}");
        }
    }

    #[test]
    fn v2_bucket_spans_the_whole_weight_range() {
        assert_eq!(bucket_v2(0, 100), 0);
        assert_eq!(bucket_v2(u32::MAX, 100), 99);
        assert_eq!(bucket_v2(u32::MAX, MAX_WEIGHT_SUM), MAX_WEIGHT_SUM - 1);
        assert_eq!(bucket_v2(1 << 31, 2), 1);
    }

    #[test]
    fn weights_are_validated_as_flagd_does() {
        let parse = |v: serde_json::Value| {
            let items: Vec<Val<'static>> = v
                .as_array()
                .unwrap()
                .iter()
                .cloned()
                .map(Val::from_owned_json)
                .collect();
            Distribution::parse(&items)
        };
        let d = parse(serde_json::json!([
            ["a", -5],
            ["b"],
            ["c", null],
            ["d", 2.0]
        ]))
        .unwrap();
        assert_eq!(d.weights, vec![0, 1, 1, 2]);
        assert_eq!(d.total, 4);
        assert!(parse(serde_json::json!([["a", 1.5]])).is_none());
        assert!(parse(serde_json::json!([["a", "1"]])).is_none());
        assert!(parse(serde_json::json!([[{"x": 1}, 1]])).is_none());
        assert!(parse(serde_json::json!([[]])).is_none());
        assert!(parse(serde_json::json!(["a"])).is_none());
        assert!(parse(serde_json::json!([])).is_none());
        assert!(parse(serde_json::json!([["a", 2147483647]])).is_some());
        assert!(parse(serde_json::json!([["a", 2147483648u64]])).is_none());
        assert!(parse(serde_json::json!([["a", 2147483647], ["b", 1]])).is_none());
        let zero = parse(serde_json::json!([["a", 0], ["b", -1]])).unwrap();
        assert!(matches!(
            zero.choose(&BucketKey::Given("x"), FractionalBucketing::V2),
            Val::Null
        ));
    }
}
