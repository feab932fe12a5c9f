//! huskd's image store: references, pulling from registries, a
//! content-addressed blob store with image records, safe layer unpacking and
//! the read-only filesystem image each VM gets.

pub mod reference;
pub mod unpack;
