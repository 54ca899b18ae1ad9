//! The local process supervisor of nonstop: [`LocalDriver`] implements
//! [`nonstop_core::driver::Driver`] with one monitor process per instance
//! (see [`monitor`]), so that instances keep running when the daemon exits
//! or crashes and a restarted daemon re-adopts them by (pid, start time).
//! It also reads the instances' log files ([`logs`]).

pub mod driver;
pub mod logfile;
pub mod logs;
pub mod memory;
pub mod monitor;
pub mod ports;
pub mod procinfo;
pub mod records;
pub mod state;

pub use driver::{
    running_under, HandshakeError, LaunchError, LocalDriver, LocalDriverConfig, StopError, SupervisorError,
    DEFAULT_LOG_KEEP, DEFAULT_LOG_MAX_BYTES,
};
pub use logfile::Stream;
pub use logs::{LogLine, LogQuery};
pub use monitor::monitor_main;
pub use ports::free_port;
pub use state::InstanceRecord;
