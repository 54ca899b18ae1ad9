#![forbid(unsafe_code)]
pub mod histogram;
pub mod key;
mod ring;
pub mod store;
pub mod time;
