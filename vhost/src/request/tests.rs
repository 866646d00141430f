//! Unit tests of request parsing: hand-built descriptor chains, well-formed and hostile.
