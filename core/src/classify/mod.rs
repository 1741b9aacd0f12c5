//! SQL classification (in progress).
