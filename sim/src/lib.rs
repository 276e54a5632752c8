//! Placeholder: the simulator's issue has not landed yet. See ARCHITECTURE.md.
