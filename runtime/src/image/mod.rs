//! huskd's image store: references, pulling from registries, a
//! content-addressed blob store with image records, safe layer unpacking and
//! the read-only filesystem image each VM gets.
//!
//! Entry point: [`ImageStore`].

pub mod blobs;
pub mod fsimage;
mod import;
pub mod pull;
pub mod record;
pub mod reference;
pub mod store;
pub mod unpack;

pub use blobs::Digest;
pub use pull::{Credentials, PullError, RegistryConfig, RegistryHost};
pub use record::{ImageId, ImageRecord, LayerRecord};
pub use reference::ImageReference;
pub use store::{FsUsage, ImageStore, Removed, StoreError};
