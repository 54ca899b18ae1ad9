//! Ports for web instances.
//!
//! A web instance is told its `PORT` before it binds it, so the port must
//! stay free between the check and the app's `bind`. A port the kernel picks
//! for `bind(127.0.0.1:0)` comes from the ephemeral range
//! (`net.ipv4.ip_local_port_range`), where every outgoing connection on the
//! machine also takes its local port: once the probe socket is closed, any
//! `connect` or another `bind(:0)` may take it first, and the app dies with
//! "Address already in use" (seen in CI, with many tests connecting at once).
//!
//! So ports come from outside the ephemeral range, which the kernel never
//! hands out on its own ([`range_outside_ephemeral`]). A random start keeps
//! two daemons on one machine apart; a strict probe (a bind without
//! `SO_REUSEADDR`) skips ports in use and ports still in `TIME_WAIT`, so an
//! app that does not set `SO_REUSEADDR` can bind them too; and a port this
//! process handed out is not handed out again for [`HOLD`], the time its
//! instance has to bind it.
//!
//! The choice ([`Picker::pick`]) takes the clock and the probe as
//! parameters; only [`free_port`] touches sockets.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a handed-out port is kept from other instances of this process.
pub const HOLD: Duration = Duration::from_secs(120);
/// Ports probed before falling back to a kernel-chosen one.
const MAX_PROBES: usize = 2000;
/// Handed-out ports remembered at most (older ones are forgotten first).
const MAX_HELD: usize = 4096;
/// Ports below this are left to system services.
const LOWEST: u16 = 10_000;
/// A range with fewer ports than this is not worth using.
const MIN_RANGE: u32 = 1000;

/// Where to pick from, given the contents of
/// `/proc/sys/net/ipv4/ip_local_port_range` ("32768\t60999"): below the
/// ephemeral range (from 10000), else above it; `None` when neither has
/// room (or the contents are unreadable), and the kernel picks.
pub fn range_outside_ephemeral(ip_local_port_range: Option<&str>) -> Option<RangeInclusive<u16>> {
    let mut fields = ip_local_port_range?.split_whitespace().map(str::parse::<u16>);
    let (low, high) = match (fields.next(), fields.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => (low, high),
        _ => return None,
    };
    if low > LOWEST && u32::from(low - LOWEST) >= MIN_RANGE {
        return Some(LOWEST..=low - 1);
    }
    if u32::from(u16::MAX - high) >= MIN_RANGE {
        return Some(high + 1..=u16::MAX);
    }
    None
}

/// The pure part: which port to hand out next.
#[derive(Debug)]
pub struct Picker {
    range: RangeInclusive<u16>,
    /// Handed-out ports with when, oldest first.
    held: VecDeque<(u16, Instant)>,
}

impl Picker {
    pub fn new(range: RangeInclusive<u16>) -> Self {
        Self { range, held: VecDeque::new() }
    }

    /// The first port from `start` on (wrapping within the range) that this
    /// picker did not hand out within [`HOLD`] and that `probe` says is free;
    /// `None` after [`MAX_PROBES`] probes or once every port was tried.
    /// The port is remembered as handed out at `now`.
    pub fn pick(&mut self, start: u64, now: Instant, mut probe: impl FnMut(u16) -> bool) -> Option<u16> {
        while self.held.front().is_some_and(|&(_, at)| now.saturating_duration_since(at) >= HOLD)
            || self.held.len() >= MAX_HELD
        {
            self.held.pop_front();
        }
        let first = u32::from(*self.range.start());
        let size = u32::from(*self.range.end()) - first + 1;
        let offset = (start % u64::from(size)) as u32;
        let mut probes = 0;
        for i in 0..size {
            let port = (first + (offset + i) % size) as u16;
            if self.held.iter().any(|&(p, _)| p == port) {
                continue;
            }
            if probes == MAX_PROBES {
                return None;
            }
            probes += 1;
            if probe(port) {
                self.held.push_back((port, now));
                return Some(port);
            }
        }
        None
    }
}

/// A free port on 127.0.0.1 for an app to bind, picked as the module says.
pub fn free_port() -> io::Result<u16> {
    static PICKER: OnceLock<Option<Mutex<Picker>>> = OnceLock::new();
    let picker = PICKER.get_or_init(|| {
        let contents = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
        range_outside_ephemeral(contents.as_deref()).map(|range| Mutex::new(Picker::new(range)))
    });
    if let Some(picker) = picker {
        let start = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let mut picker = picker.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(port) = picker.pick(start, Instant::now(), |port| strictly_free(port).unwrap_or(false)) {
            return Ok(port);
        }
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Whether `port` on 127.0.0.1 can be bound by a socket without
/// `SO_REUSEADDR` (so: not listening, not connected, not in `TIME_WAIT`).
fn strictly_free(port: u16) -> io::Result<bool> {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    let [a, b, c, d] = Ipv4Addr::LOCALHOST.octets();
    match bind(fd.as_raw_fd(), &SockaddrIn::new(a, b, c, d, port)) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EADDRINUSE | nix::errno::Errno::EACCES) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_is_below_the_ephemeral_range_when_there_is_room() {
        assert_eq!(range_outside_ephemeral(Some("32768\t60999\n")), Some(10_000..=32_767));
        assert_eq!(range_outside_ephemeral(Some("49152 65535")), Some(10_000..=49_151));
    }

    #[test]
    fn the_range_is_above_the_ephemeral_range_when_below_has_no_room() {
        assert_eq!(range_outside_ephemeral(Some("10500 50000")), Some(50_001..=65_535));
        assert_eq!(range_outside_ephemeral(Some("1024 50000")), Some(50_001..=65_535));
    }

    #[test]
    fn the_kernel_picks_when_the_ephemeral_range_leaves_no_room_or_is_unreadable() {
        assert_eq!(range_outside_ephemeral(Some("1024 65000")), None);
        assert_eq!(range_outside_ephemeral(None), None);
        assert_eq!(range_outside_ephemeral(Some("")), None);
        assert_eq!(range_outside_ephemeral(Some("32768")), None);
        assert_eq!(range_outside_ephemeral(Some("60999 32768")), None);
        assert_eq!(range_outside_ephemeral(Some("x y")), None);
    }

    #[test]
    fn picks_from_the_start_within_the_range_and_skips_ports_in_use() {
        let now = Instant::now();
        let mut picker = Picker::new(20_000..=20_009);
        assert_eq!(picker.pick(3, now, |_| true), Some(20_003));
        let mut picker = Picker::new(20_000..=20_009);
        assert_eq!(picker.pick(13, now, |p| p != 20_003 && p != 20_004), Some(20_005));
        // Wraps around the end of the range.
        let mut picker = Picker::new(20_000..=20_009);
        assert_eq!(picker.pick(9, now, |p| p != 20_009), Some(20_000));
    }

    #[test]
    fn a_handed_out_port_is_not_handed_out_again_until_its_hold_ends() {
        let now = Instant::now();
        let mut picker = Picker::new(20_000..=20_002);
        assert_eq!(picker.pick(0, now, |_| true), Some(20_000));
        // The app has not bound it yet, so the probe still says free.
        assert_eq!(picker.pick(0, now, |_| true), Some(20_001));
        assert_eq!(picker.pick(0, now + Duration::from_secs(1), |_| true), Some(20_002));
        assert_eq!(picker.pick(0, now + Duration::from_secs(2), |_| true), None, "all held");
        assert_eq!(picker.pick(0, now + HOLD, |_| true), Some(20_000), "the first hold ended");
        assert_eq!(picker.pick(0, now + HOLD, |_| true), Some(20_001));
    }

    #[test]
    fn gives_up_when_nothing_in_the_range_is_free() {
        let mut picker = Picker::new(20_000..=20_004);
        let mut probed = Vec::new();
        assert_eq!(
            picker.pick(2, Instant::now(), |p| {
                probed.push(p);
                false
            }),
            None
        );
        assert_eq!(probed, [20_002, 20_003, 20_004, 20_000, 20_001], "each port probed once");
        let mut picker = Picker::new(10_000..=65_535);
        let mut probes = 0;
        assert_eq!(
            picker.pick(0, Instant::now(), |_| {
                probes += 1;
                false
            }),
            None
        );
        assert_eq!(probes, MAX_PROBES);
    }

    #[test]
    fn free_port_is_outside_the_ephemeral_range_and_bindable() {
        let contents = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let range = range_outside_ephemeral(Some(&contents)).expect("this machine's ephemeral range leaves room");
        let a = free_port().unwrap();
        let b = free_port().unwrap();
        assert!(range.contains(&a) && range.contains(&b), "{a} and {b} in {range:?}");
        assert_ne!(a, b, "a port just handed out is held");
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, a)).unwrap();
        assert!(!strictly_free(a).unwrap(), "a listening port is not free");
        drop(listener);
    }
}
