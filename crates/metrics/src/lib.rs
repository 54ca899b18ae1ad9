#![forbid(unsafe_code)]
pub mod histogram;
pub mod key;
pub mod persist;
mod ring;
pub mod sampler;
pub mod store;
pub mod time;
