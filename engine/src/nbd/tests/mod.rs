//! Tests of the NBD module.

mod protocol_golden;
