//! Metrics of nonstop: what the daemon measures continuously, kept with
//! bounded memory and storage, and shown as `nonstop metrics` and
//! Prometheus text.
//!
//! The parts, each usable on its own:
//!
//! - [`SeriesKey`] and [`Metric`] (`key`): a series is a small typed label
//!   set (app, environment, and optionally process type, release and
//!   instance slot) and one metric, whose [`Kind`] says how its samples
//!   combine: counter, gauge or latency histogram;
//! - [`Store`] (`store`, pure): every series as 5 s points for an hour
//!   and 1 min points for a day, in rings of fixed capacity; a 1 min
//!   point is the merge of its twelve 5 s points; a cap on the number of
//!   series, stale ones (instances, releases that are gone) giving their
//!   place to new ones and expiring; memory bounded by
//!   [`Limits::max_heap_bytes`]. Time is always passed in: nothing here
//!   reads a clock;
//! - [`Histogram`] (`histogram`): the proxy's latency buckets (×1.25 from
//!   100 µs), mergeable, quantiles within one bucket;
//! - `persist`: the store in one compact, versioned, checksummed file,
//!   written atomically, read within a size bound; a damaged or newer file
//!   is moved aside and reported, never fatal;
//! - `sampler`: CPU % and RSS of whole process groups from `/proc`
//!   (procfs), with the delta maths a pure function;
//! - `prometheus`: the current values as Prometheus text 0.0.4;
//! - [`sparkline()`]: `▁▂▃▄▅▆▇█` from a series' recent values.
//!
//! The API is synchronous. The intended use by the daemon, from one task
//! that owns the store behind a mutex:
//!
//! ```text
//! start:   Loaded { store, problem } = persist::load(&home.join("metrics"), Limits::default(), now)
//!          if let Some(p) = problem { warn!("{p}") }          // moved aside or unreadable: starts empty
//! every 5 s (now = Timestamp::from_system_time(SystemTime::now())):
//!          readings = sampler.sample(&[(instance_key, pgid), ..], now)?      // CPU %, RSS per instance
//!          store.gauge(&key.with_metric(Metric::CpuPercent), now, cpu)      // for each reading with a CPU %
//!          store.count(&web_v7(Metric::Requests), now, delta)               // proxy figures, diffed, zeros included
//!          store.histogram(&web_v7(Metric::Latency), now, &Histogram::from_latency(&delta, sum))
//!          store.expire(now)
//! every minute and at shutdown:  bytes = persist::encode(&store) (under the lock); persist::write_atomic(dir, &bytes) (off it)
//! GET /metrics:                  prometheus::render(&store, now), Content-Type prometheus::CONTENT_TYPE
//! nonstop metrics:               store.select(&filter), store.window(..), sparkline(&store.recent(key, Resolution::FiveSeconds, now, 60))
//! ```

#![forbid(unsafe_code)]

pub mod histogram;
pub mod key;
pub mod persist;
pub mod prometheus;
mod ring;
pub mod sampler;
pub mod sparkline;
pub mod store;
pub mod time;

pub use histogram::Histogram;
pub use key::{Filter, Kind, Metric, SeriesKey, StatusClass};
pub use persist::{load, save, LoadError, Loaded, SaveError};
pub use sampler::{GroupReading, Sampler};
pub use sparkline::sparkline;
pub use store::{Current, CurrentValue, Limits, PointValue, PointView, RecordError, Sample, Store, Summary};
pub use time::{Resolution, Timestamp};
