//! The daemon's HTTP API: wire types, the server, and the client the CLI
//! uses. Handlers only parse and forward to the engine (the one owner of
//! state); only this crate knows JSON-over-HTTP.
//!
//! Transport: a unix socket with mode 0600 (`$NONSTOP_HOME/nonstop.sock`),
//! and optionally TCP, which requires `Authorization: Bearer <token>`.
//! Long operations answer with NDJSON: `progress` lines, then one `result`
//! or `error` line.
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod dashboard;
pub mod server;
pub mod wire;
