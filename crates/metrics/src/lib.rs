#![forbid(unsafe_code)]
pub mod histogram;
pub mod key;
pub mod persist;
pub mod prometheus;
mod ring;
pub mod sampler;
pub mod store;
pub mod time;
