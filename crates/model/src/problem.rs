//! Validation problems: a JSON Pointer and a plain message each.

use std::fmt;

/// One thing wrong with a flag document, located by a JSON Pointer (RFC 6901) into that document.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Problem {
    /// Where the problem is, e.g. `/flags/new-banner/defaultVariant`; empty for the whole document.
    pub pointer: String,
    /// What is wrong, in words an admin can act on.
    pub message: String,
}

impl Problem {
    pub fn new(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            pointer: pointer.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = if self.pointer.is_empty() {
            "(document)"
        } else {
            &self.pointer
        };
        write!(f, "{at}: {}", self.message)
    }
}

/// Every problem found in one document; never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} problem(s): {}", .0.len(), summary(.0))]
pub struct Problems(pub Vec<Problem>);

fn summary(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Problems {
    /// `Ok(())` when there is nothing to report.
    pub fn into_result(mut self) -> Result<(), Problems> {
        if self.0.is_empty() {
            Ok(())
        } else {
            self.0.sort();
            self.0.dedup();
            Err(self)
        }
    }
}

/// Builds a JSON Pointer from segments, escaping `~` and `/` as RFC 6901 requires.
pub fn pointer<I, S>(segments: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = String::new();
    for segment in segments {
        out.push('/');
        for c in segment.as_ref().chars() {
            match c {
                '~' => out.push_str("~0"),
                '/' => out.push_str("~1"),
                c => out.push(c),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_escapes_tilde_and_slash() {
        assert_eq!(pointer(["flags", "a/b~c", "state"]), "/flags/a~1b~0c/state");
        assert_eq!(pointer(Vec::<&str>::new()), "");
    }

    #[test]
    fn problems_display_lists_every_problem() {
        let p = Problems(vec![Problem::new("/a", "x"), Problem::new("", "y")]);
        assert_eq!(p.to_string(), "2 problem(s): /a: x; (document): y");
    }
}
