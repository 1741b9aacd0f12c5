//! Masking engine (in progress).
