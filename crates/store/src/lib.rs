//! Placeholder: this crate's issue has not landed yet. See ARCHITECTURE.md.
