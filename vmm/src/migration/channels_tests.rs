//! Tests of multi-channel transfers.
