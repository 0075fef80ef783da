//! Shared fixtures for the cross-crate integration tests in `tests/tests/`.
#![forbid(unsafe_code)]
