//! CPU and memory of whole process groups (an instance is one: gunicorn's
//! master and its workers, celery and its children), read from `/proc`
//! through the `procfs` crate.
//!
//! One pass over `/proc` per sample reads every process's `stat`; a
//! process belongs to the group its `pgrp` names. For a group:
//!
//! - **CPU** is the sum of user and system time of its processes *and of
//!   the children they reaped* (`cutime`, `cstime`): a gunicorn worker
//!   recycled after `max_requests` moves its time into its master's
//!   children's time when reaped, so the group's total does not drop. CPU
//!   % is the growth of that total between two samples over the wall time
//!   between them ([`cpu_percent`], pure): 100 = one CPU busy.
//! - **RSS** is the sum of its processes' resident set sizes (`statm`,
//!   read for the group's processes only): pages
//!   shared between processes (a preloaded app forked into workers) are
//!   counted once per process, as `ps` does.
//!
//! Sampling reads files and nothing else: no signal, no ptrace. A process
//! that exits during the pass is skipped.

use crate::time::Timestamp;
use std::collections::HashMap;
use std::hash::Hash;

/// Why `/proc` could not be read at all (a single process that vanished
/// is not an error).
#[derive(Debug, thiserror::Error)]
#[error("cannot list processes in /proc: {source}")]
pub struct SampleError {
    #[source]
    pub source: procfs::ProcError,
}

/// What one pass over `/proc` found for one process group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupUsage {
    /// CPU time of its processes and of the children they reaped, in
    /// clock ticks ([`Sampler::ticks_per_second`]).
    pub cpu_ticks: u64,
    /// Resident memory of its processes, in bytes.
    pub rss_bytes: u64,
    /// How many processes it has.
    pub processes: u32,
}

/// Read the usage of every group in `pgids` in one pass over `/proc`.
/// Groups without a process are absent from the answer.
pub fn read_groups(pgids: &[i32], page_size: u64) -> Result<HashMap<i32, GroupUsage>, SampleError> {
    let mut out: HashMap<i32, GroupUsage> = HashMap::new();
    if pgids.is_empty() {
        return Ok(out);
    }
    for process in procfs::process::all_processes().map_err(|source| SampleError { source })? {
        // A process that exited meanwhile (or one we may not read) is
        // not part of any group any more.
        let Ok(process) = process else { continue };
        let Ok(stat) = process.stat() else { continue };
        if !pgids.contains(&stat.pgrp) {
            continue;
        }
        // `statm` counts resident pages exactly; `stat`'s count is the
        // kernel's quick approximate read (off by tens of pages).
        let rss_pages = process.statm().map_or(stat.rss, |m| m.resident);
        let u = out.entry(stat.pgrp).or_default();
        let children = u64::try_from(stat.cutime.max(0)).unwrap_or(0) + u64::try_from(stat.cstime.max(0)).unwrap_or(0);
        u.cpu_ticks = u.cpu_ticks.saturating_add(stat.utime).saturating_add(stat.stime).saturating_add(children);
        u.rss_bytes = u.rss_bytes.saturating_add(rss_pages.saturating_mul(page_size));
        u.processes += 1;
    }
    Ok(out)
}

/// A group's CPU total at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuReading {
    pub ticks: u64,
    pub at: Timestamp,
}

/// CPU use between two readings of the same group, in percent of one CPU.
/// `None` when no time passed, or the total went down (a process left the
/// group and took its time with it: this interval cannot be told).
pub fn cpu_percent(earlier: CpuReading, later: CpuReading, ticks_per_second: u64) -> Option<f64> {
    let elapsed_ms = later.at.as_millis().checked_sub(earlier.at.as_millis()).filter(|&ms| ms > 0)?;
    let ticks = later.ticks.checked_sub(earlier.ticks)?;
    if ticks_per_second == 0 {
        return None;
    }
    let cpu_seconds = ticks as f64 / ticks_per_second as f64;
    Some(cpu_seconds / (elapsed_ms as f64 / 1000.0) * 100.0)
}

/// One group's figures from [`Sampler::sample`].
#[derive(Debug, Clone, PartialEq)]
pub struct GroupReading<L> {
    pub label: L,
    pub pgid: i32,
    /// Since the previous sample of the same label and group; `None` at
    /// the first (or see [`cpu_percent`]).
    pub cpu_percent: Option<f64>,
    pub rss_bytes: u64,
    pub processes: u32,
}

/// Samples groups again and again, keeping each label's previous CPU
/// reading to turn totals into percentages. Labels are the caller's (an
/// instance id, a series key).
#[derive(Debug)]
pub struct Sampler<L> {
    previous: HashMap<L, (i32, CpuReading)>,
    ticks_per_second: u64,
    page_size: u64,
}

impl<L: Clone + Eq + Hash> Default for Sampler<L> {
    fn default() -> Self {
        Self::new()
    }
}

impl<L: Clone + Eq + Hash> Sampler<L> {
    /// A sampler with the system's clock tick rate and page size.
    pub fn new() -> Sampler<L> {
        Sampler {
            previous: HashMap::new(),
            ticks_per_second: procfs::ticks_per_second(),
            page_size: procfs::page_size(),
        }
    }

    /// Clock ticks per second (`_SC_CLK_TCK`).
    pub fn ticks_per_second(&self) -> u64 {
        self.ticks_per_second
    }

    /// Read every `(label, process group id)` at `at` (the caller's
    /// clock). Groups with no process left are absent from the answer;
    /// labels not asked for are forgotten. A label whose group id changed
    /// (its instance was restarted) starts over.
    pub fn sample(&mut self, groups: &[(L, i32)], at: Timestamp) -> Result<Vec<GroupReading<L>>, SampleError> {
        let pgids: Vec<i32> = groups.iter().map(|(_, g)| *g).collect();
        let usage = read_groups(&pgids, self.page_size)?;
        let mut previous = std::mem::take(&mut self.previous);
        let mut out = Vec::with_capacity(groups.len());
        for (label, pgid) in groups {
            let Some(u) = usage.get(pgid) else { continue };
            let now = CpuReading { ticks: u.cpu_ticks, at };
            let cpu = match previous.remove(label) {
                Some((g, before)) if g == *pgid => cpu_percent(before, now, self.ticks_per_second),
                _ => None,
            };
            self.previous.insert(label.clone(), (*pgid, now));
            out.push(GroupReading {
                label: label.clone(),
                pgid: *pgid,
                cpu_percent: cpu,
                rss_bytes: u.rss_bytes,
                processes: u.processes,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(ticks: u64, ms: u64) -> CpuReading {
        CpuReading { ticks, at: Timestamp::from_millis(ms) }
    }

    #[test]
    fn cpu_percent_from_deltas() {
        // 100 ticks/s: 500 ticks in 5 s = one CPU.
        assert_eq!(cpu_percent(r(1_000, 10_000), r(1_500, 15_000), 100), Some(100.0));
        // Two CPUs.
        assert_eq!(cpu_percent(r(0, 0), r(1_000, 5_000), 100), Some(200.0));
        // Idle.
        assert_eq!(cpu_percent(r(7, 0), r(7, 5_000), 100), Some(0.0));
        // A quarter over 2 s at 250 Hz.
        assert_eq!(cpu_percent(r(0, 0), r(125, 2_000), 250), Some(25.0));
    }

    #[test]
    fn cpu_percent_refuses_what_cannot_be_told() {
        assert_eq!(cpu_percent(r(0, 5_000), r(100, 5_000), 100), None, "no time passed");
        assert_eq!(cpu_percent(r(0, 6_000), r(100, 5_000), 100), None, "time went back");
        assert_eq!(cpu_percent(r(900, 0), r(100, 5_000), 100), None, "the total went down");
        assert_eq!(cpu_percent(r(0, 0), r(100, 5_000), 0), None, "no tick rate");
    }

    #[test]
    fn nothing_asked_reads_nothing() {
        assert!(read_groups(&[], 4096).unwrap().is_empty());
        let mut s: Sampler<&str> = Sampler::new();
        assert!(s.sample(&[], Timestamp::from_secs(1)).unwrap().is_empty());
        assert!(s.ticks_per_second() > 0);
    }

    #[test]
    fn a_group_that_does_not_exist_is_absent() {
        // Process group ids are process ids; i32::MAX is above pid_max.
        let mut s = Sampler::new();
        assert!(s.sample(&[("gone", i32::MAX)], Timestamp::from_secs(1)).unwrap().is_empty());
    }
}
