//! flagd's `sem_ver` operation: Go's `golang.org/x/mod/semver` rules, which flagd uses.
//!
//! A version is `v`MAJOR[.MINOR[.PATCH[-PRERELEASE][+BUILD]]] after flagd's normalisation (a
//! missing `v` is added, a leading `V` becomes `v`); `v1` and `v1.2` stand for `v1.0.0` and
//! `v1.2.0`; numbers have no leading zeros; build metadata is ignored in comparisons. `^` matches
//! on the major version and `~` on major and minor (prereleases ignored), as flagd defines them —
//! not npm's caret and tilde ranges. The `semver` crate follows Cargo's rules (no partial versions,
//! no `v`), so this is written out here.

use std::cmp::Ordering;

use crate::val::Val;

/// A parsed version borrowing from its text: numbers kept as digit strings so any size compares
/// correctly, and parsing allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Version<'s> {
    major: &'s str,
    minor: &'s str,
    patch: &'s str,
    /// Prerelease identifiers joined by dots, without the `-`; empty for a release.
    pre: &'s str,
}

/// A version kept in a compiled rule (a literal target), parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OwnedVersion {
    major: Box<str>,
    minor: Box<str>,
    patch: Box<str>,
    pre: Box<str>,
    /// The same version as a [`Release`], when it is one.
    release: Option<Release>,
}

impl OwnedVersion {
    pub(crate) fn view(&self) -> Version<'_> {
        Version::new(&self.major, &self.minor, &self.patch, &self.pre)
    }

    pub(crate) fn release(&self) -> Option<Release> {
        self.release
    }
}

/// A release version (no prerelease, no build metadata) as its three numbers, each of at most 18
/// digits: compared as integers, with no text to walk. The common case, tried before
/// [`Version::normalize_and_parse`]; it accepts only what that parses, with the same meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Release([u64; 3]);

impl Release {
    /// `None` for anything but `[vV]`MAJOR[.MINOR[.PATCH]] with small numbers and no leading
    /// zeros: the full parse decides those.
    #[inline]
    pub(crate) fn parse(s: &str) -> Option<Release> {
        let mut rest = match s.as_bytes() {
            [b'v' | b'V', rest @ ..] => rest,
            all => all,
        };
        let mut parts = [0u64; 3];
        for (i, part) in parts.iter_mut().enumerate() {
            let (n, after) = release_number(rest)?;
            *part = n;
            match after {
                [] => return Some(Release(parts)),
                [b'.', more @ ..] if i < 2 => rest = more,
                _ => return None,
            }
        }
        None
    }
}

/// The number at the start of `b` and the bytes after it: at least one digit, at most 18 (so it
/// fits a u64), no leading zero unless it is 0.
#[inline(always)]
fn release_number(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut n = 0u64;
    let mut len = 0;
    while let Some(d) = b.get(len).map(|c| c.wrapping_sub(b'0')).filter(|d| *d <= 9) {
        // Wrapping: a number too long to fit is refused below anyway.
        n = n.wrapping_mul(10).wrapping_add(u64::from(d));
        len += 1;
    }
    if len == 0 || len > 18 || (len > 1 && b[0] == b'0') {
        return None;
    }
    Some((n, &b[len..]))
}

/// The comparison of `sem_ver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SemverOp {
    Eq,
    Ne,
    Lt,
    Le,
    Ge,
    Gt,
    /// `^`: same major version.
    Major,
    /// `~`: same major and minor version.
    Minor,
}

impl SemverOp {
    pub(crate) fn parse(s: &str) -> Option<SemverOp> {
        Some(match s {
            "=" => SemverOp::Eq,
            "!=" => SemverOp::Ne,
            "<" => SemverOp::Lt,
            "<=" => SemverOp::Le,
            ">=" => SemverOp::Ge,
            ">" => SemverOp::Gt,
            "^" => SemverOp::Major,
            "~" => SemverOp::Minor,
            _ => return None,
        })
    }

    /// [`SemverOp::apply`] on two releases.
    #[inline]
    pub(crate) fn apply_release(self, a: Release, b: Release) -> bool {
        let (a, b) = (a.0, b.0);
        match self {
            SemverOp::Eq => a == b,
            SemverOp::Ne => a != b,
            SemverOp::Lt => a < b,
            SemverOp::Le => a <= b,
            SemverOp::Ge => a >= b,
            SemverOp::Gt => a > b,
            SemverOp::Major => a[0] == b[0],
            SemverOp::Minor => a[..2] == b[..2],
        }
    }

    pub(crate) fn apply(self, a: &Version<'_>, b: &Version<'_>) -> bool {
        match self {
            SemverOp::Eq => a.cmp(b) == Ordering::Equal,
            SemverOp::Ne => a.cmp(b) != Ordering::Equal,
            SemverOp::Lt => a.cmp(b) == Ordering::Less,
            SemverOp::Le => a.cmp(b) != Ordering::Greater,
            SemverOp::Ge => a.cmp(b) != Ordering::Less,
            SemverOp::Gt => a.cmp(b) == Ordering::Greater,
            SemverOp::Major => a.major == b.major,
            SemverOp::Minor => a.major == b.major && a.minor == b.minor,
        }
    }
}

/// The text of a `sem_ver` argument as flagd reads it: strings as they are, numbers as Go's `%v`
/// prints them (so `1.2` is `v1.2`); `None` for anything else (`true`, `null`, arrays), which no
/// version parses.
pub(crate) fn version_text<'v>(v: &'v Val<'_>) -> Option<std::borrow::Cow<'v, str>> {
    match v {
        Val::Str(s) => Some((*s).into()),
        Val::String(s) => Some(s.as_str().into()),
        Val::Num(n) => go_float_text(*n).map(Into::into),
        _ => None,
    }
}

impl<'s> Version<'s> {
    /// Parses after flagd's normalisation: a missing `v` is added, a leading `V` becomes `v`.
    pub(crate) fn normalize_and_parse(s: &'s str) -> Option<Version<'s>> {
        match s.strip_prefix('v') {
            Some(rest) => Version::parse_unprefixed(rest),
            None => Version::parse_unprefixed(s.strip_prefix('V').unwrap_or(s)),
        }
    }

    fn parse_unprefixed(v: &'s str) -> Option<Version<'s>> {
        let (major, rest) = parse_int(v)?;
        let Some(rest) = rest.strip_prefix('.') else {
            return rest.is_empty().then_some(Version::new(major, "0", "0", ""));
        };
        let (minor, rest) = parse_int(rest)?;
        let Some(rest) = rest.strip_prefix('.') else {
            return rest
                .is_empty()
                .then_some(Version::new(major, minor, "0", ""));
        };
        let (patch, mut rest) = parse_int(rest)?;
        let mut pre = "";
        if let Some(p) = rest.strip_prefix('-') {
            let end = p.find('+').unwrap_or(p.len());
            for ident in p[..end].split('.') {
                let numeric = !ident.is_empty() && ident.bytes().all(|b| b.is_ascii_digit());
                if !valid_ident(ident) || (numeric && ident.len() > 1 && ident.starts_with('0')) {
                    return None;
                }
            }
            pre = &p[..end];
            rest = &p[end..];
        }
        if let Some(build) = rest.strip_prefix('+') {
            if !build.split('.').all(valid_ident) {
                return None;
            }
            rest = "";
        }
        rest.is_empty()
            .then_some(Version::new(major, minor, patch, pre))
    }

    pub(crate) fn to_owned_version(self) -> OwnedVersion {
        OwnedVersion {
            major: self.major.into(),
            minor: self.minor.into(),
            patch: self.patch.into(),
            pre: self.pre.into(),
            release: if self.pre.is_empty() {
                Release::parse(&format!("{}.{}.{}", self.major, self.minor, self.patch))
            } else {
                None
            },
        }
    }

    fn new(major: &'s str, minor: &'s str, patch: &'s str, pre: &'s str) -> Version<'s> {
        Version {
            major,
            minor,
            patch,
            pre,
        }
    }
}

impl PartialOrd for Version<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        cmp_num(self.major, other.major)
            .then_with(|| cmp_num(self.minor, other.minor))
            .then_with(|| cmp_num(self.patch, other.patch))
            .then_with(|| cmp_pre(self.pre, other.pre))
    }
}

/// Digit strings without leading zeros compare by length, then lexically.
fn cmp_num(a: &str, b: &str) -> Ordering {
    // Byte by byte: version numbers are a few digits, shorter than a `memcmp` call is worth.
    a.len().cmp(&b.len()).then_with(|| a.bytes().cmp(b.bytes()))
}

fn cmp_pre(a: &str, b: &str) -> Ordering {
    match (a.is_empty(), b.is_empty()) {
        (true, true) => return Ordering::Equal,
        // A release sorts after its prereleases.
        (true, false) => return Ordering::Greater,
        (false, true) => return Ordering::Less,
        _ => {}
    }
    let (mut xs, mut ys) = (a.split('.'), b.split('.'));
    loop {
        match (xs.next(), ys.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x == y => continue,
            (Some(x), Some(y)) => {
                return match (is_num(x), is_num(y)) {
                    (true, false) => Ordering::Less,
                    (false, true) => Ordering::Greater,
                    (true, true) => cmp_num(x, y),
                    (false, false) => x.cmp(y),
                }
            }
        }
    }
}

fn is_num(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit())
}

fn valid_ident(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Leading digits of `v` (at least one, no leading zero unless the number is 0) and the rest.
fn parse_int(v: &str) -> Option<(&str, &str)> {
    let end = v
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(v.len());
    let digits = &v[..end];
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    Some((digits, &v[end..]))
}

/// Go's `fmt.Sprintf("%v", f)` for the numbers that can read as a version: plain decimals with
/// no exponent. Go switches to an exponent from 1e6 up (and below 1e-4), which no version
/// parses, so those give `None`.
fn go_float_text(n: f64) -> Option<String> {
    if n == 0.0 {
        return Some("0".into());
    }
    if !(1e-4..1e6).contains(&n) {
        return None;
    }
    Some(format!("{n}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version<'_> {
        Version::normalize_and_parse(s).unwrap_or_else(|| panic!("{s} should parse"))
    }

    fn from_val(v: &Val<'_>) -> Option<String> {
        let text = version_text(v)?.into_owned();
        Version::normalize_and_parse(&text)?;
        Some(text)
    }

    #[test]
    fn versions_accept_v_prefix_and_partial_forms() {
        assert_eq!(v("1.2.3"), v("v1.2.3"));
        assert_eq!(v("V1.2.3"), v("v1.2.3"));
        assert_eq!(v("1"), v("1.0.0"));
        assert_eq!(v("1.2"), v("1.2.0"));
    }

    #[test]
    fn invalid_versions_are_refused() {
        for bad in [
            "",
            "v",
            "1.2.3.4",
            "01.2.3",
            "1.02.3",
            "1.2.3-",
            "1.2.3-01",
            "1.2-pre",
            "1.2.3+",
            "1.2.3-a..b",
            "x1.2.3",
            "vv1.2.3",
            "1.2.3 ",
            "-1.2.3",
            "1.2.3+a_b",
        ] {
            assert!(
                Version::normalize_and_parse(bad).is_none(),
                "{bad:?} should not parse"
            );
        }
    }

    #[test]
    fn build_metadata_is_ignored_and_prereleases_sort_first() {
        assert_eq!(v("1.2.3+build.5").cmp(&v("1.2.3")), Ordering::Equal);
        assert!(v("1.2.3-alpha") < v("1.2.3"));
        assert!(v("1.2.3-alpha") < v("1.2.3-alpha.1"));
        assert!(v("1.2.3-alpha.1") < v("1.2.3-alpha.beta"));
        assert!(v("1.2.3-2") < v("1.2.3-10"));
        assert!(v("1.2.3-beta") < v("1.2.3-rc.1"));
        assert!(v("1.10.0") > v("1.9.9"));
        assert!(v("10000000000000000000000.0.0") > v("9.0.0"));
    }

    #[test]
    fn caret_and_tilde_compare_major_and_minor_only() {
        assert!(SemverOp::Major.apply(&v("1.9.0"), &v("1.0.0")));
        assert!(!SemverOp::Major.apply(&v("2.0.0"), &v("1.0.0")));
        assert!(SemverOp::Major.apply(&v("0.9.0"), &v("0.1.0")));
        assert!(SemverOp::Minor.apply(&v("1.2.9"), &v("1.2.0")));
        assert!(!SemverOp::Minor.apply(&v("1.3.0"), &v("1.2.0")));
        assert!(SemverOp::Minor.apply(&v("1.2.0-rc.1"), &v("1.2.5")));
    }

    #[test]
    fn numbers_read_as_go_prints_them() {
        assert_eq!(from_val(&Val::Num(1.2)).as_deref(), Some("1.2"));
        assert_eq!(from_val(&Val::Num(3.0)).as_deref(), Some("3"));
        assert_eq!(from_val(&Val::Num(1.05)), None);
        assert_eq!(from_val(&Val::Num(2_000_000.0)), None);
        assert_eq!(from_val(&Val::Bool(true)), None);
        assert_eq!(from_val(&Val::Null), None);
    }

    const OPS: [SemverOp; 8] = [
        SemverOp::Eq,
        SemverOp::Ne,
        SemverOp::Lt,
        SemverOp::Le,
        SemverOp::Ge,
        SemverOp::Gt,
        SemverOp::Major,
        SemverOp::Minor,
    ];

    #[test]
    fn release_fast_path_takes_only_plain_releases() {
        for good in [
            "1",
            "v1.2",
            "V1.2.3",
            "0.0.0",
            "10.20.30",
            "123456789012345678.0.1",
        ] {
            assert!(Release::parse(good).is_some(), "{good}");
        }
        // Left to the full parse: prereleases, build metadata, leading zeros, huge numbers.
        for other in [
            "",
            "v",
            "1.",
            "1..2",
            "1.2.3.4",
            "01.2.3",
            "1.02",
            "1.2.3-rc.1",
            "1.2.3+b",
            "vv1",
            "1234567890123456789.0.0",
            " 1",
            "1.2.x",
        ] {
            assert!(Release::parse(other).is_none(), "{other}");
        }
    }

    proptest::proptest! {
        #[test]
        fn release_fast_path_agrees_with_the_full_parse(
            a in "[vV]?[0-9]{1,3}(\\.[0-9]{1,3}){0,3}(-[a-z0-9.]{0,3})?|[0-9]{17,20}(\\.0)?",
            b in "[vV]?[0-9]{1,3}(\\.[0-9]{1,3}){0,3}(-[a-z0-9.]{0,3})?|[0-9]{17,20}",
        ) {
            let (ra, rb) = (Release::parse(&a), Release::parse(&b));
            if ra.is_some() {
                proptest::prop_assert!(Version::normalize_and_parse(&a).is_some());
            }
            let owned = Version::normalize_and_parse(&b).map(Version::to_owned_version);
            proptest::prop_assert_eq!(owned.as_ref().and_then(OwnedVersion::release), rb);
            if let (Some(ra), Some(rb)) = (ra, rb) {
                let (va, vb) = (v(&a), v(&b));
                for op in OPS {
                    proptest::prop_assert_eq!(op.apply_release(ra, rb), op.apply(&va, &vb));
                }
            }
        }
    }
}
