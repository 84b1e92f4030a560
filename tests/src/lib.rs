//! Helpers to run the real vipam binaries in tests.
