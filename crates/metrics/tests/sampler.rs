//! The sampler against real processes: a process group with a shell that
//! burns a CPU and a sleeping process. Its CPU % must be one CPU (100%)
//! less the time the scheduler says the loop waited for a CPU
//! (`/proc/PID/schedstat`), and agree with the scheduler's time on a CPU
//! for the same processes over the same interval: so the check holds
//! however busy the machine is. Its RSS against each process's `statm`.

use nonstop_metrics::sampler::{read_groups, Sampler};
use nonstop_metrics::time::Timestamp;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime};

/// The group, killed (by its id) when the test ends, whatever happens;
/// both processes are this test's children, so both are reaped here.
struct Group {
    children: Vec<Child>,
    pgid: i32,
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = rustix::process::Pid::from_raw(self.pgid) {
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
    }
}

fn now() -> Timestamp {
    Timestamp::from_system_time(SystemTime::now())
}

/// The processes of group `pgid`, read without procfs.
fn members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // After the command's closing parenthesis: state, ppid, pgrp.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
        if fields[2].parse::<i32>().ok() == Some(pgid) {
            out.push(pid);
        }
    }
    out
}

/// Nanoseconds the processes spent on a CPU and waiting for one, by the
/// scheduler's account.
fn scheduler_ns(pids: &[i32]) -> (u64, u64) {
    pids.iter()
        .map(|pid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
                .expect("this test needs /proc/PID/schedstat (CONFIG_SCHED_INFO)");
            let mut f = s.split_whitespace().map(|v| v.parse::<u64>().unwrap());
            (f.next().unwrap(), f.next().unwrap())
        })
        .fold((0, 0), |(run, wait), (r, w)| (run + r, wait + w))
}

fn rss_bytes(pid: i32) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * procfs::page_size()
}

#[test]
fn a_busy_group_reads_one_cpu_and_the_memory_of_all_its_processes() {
    // A shell burning a CPU, leading a new group, and a sleeping process
    // in the same group.
    let busy = Command::new("sh").arg("-c").arg("while :; do :; done").process_group(0).spawn().expect("spawn sh");
    let pgid = i32::try_from(busy.id()).unwrap();
    let mut group = Group { children: vec![busy], pgid };
    let sleeper = Command::new("sleep").arg("1000").process_group(pgid).spawn().expect("spawn sleep");
    group.children.push(sleeper);
    let pids = members(pgid);
    assert_eq!(pids.len(), 2, "{pids:?}");

    let mut sampler = Sampler::new();
    let first = sampler.sample(&[("web.1", pgid)], now()).unwrap();
    let (run_before, wait_before) = scheduler_ns(&pids);
    let wall_before = Instant::now();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].cpu_percent, None, "no CPU % from a single sample");
    assert_eq!(first[0].processes, 2);

    std::thread::sleep(Duration::from_secs(2));

    let second = sampler.sample(&[("web.1", pgid)], now()).unwrap();
    let (run_after, wait_after) = scheduler_ns(&pids);
    let wall = wall_before.elapsed();
    let reading = &second[0];
    let cpu = reading.cpu_percent.expect("a CPU % from the second sample");
    let percent = |ns: u64| ns as f64 / wall.as_nanos() as f64 * 100.0;
    let (ran, waited) = (percent(run_after - run_before), percent(wait_after - wait_before));
    eprintln!("sampler {cpu:.1}%, scheduler: ran {ran:.1}%, waited for a CPU {waited:.1}%, over {wall:?}");
    // The sampler agrees with the scheduler within clock-tick and timing
    // granularity.
    assert!((cpu - ran).abs() <= 10.0, "sampler {cpu}% vs scheduler {ran}%");
    // The loop is always runnable: it had one whole CPU, less the time it
    // waited for one while others used them (other builds on this
    // machine). On an idle machine, that is 100% of a CPU.
    assert!((cpu + waited - 100.0).abs() <= 10.0, "sampler {cpu}% + waited {waited}% is not one CPU");
    assert!(cpu > 0.0, "a busy loop used no CPU?");

    // RSS is the sum over both processes, each read on its own.
    let each: Vec<u64> = pids.iter().map(|&p| rss_bytes(p)).collect();
    let sum: u64 = each.iter().sum();
    assert!(each.iter().all(|&b| b > 0), "{each:?}");
    assert!(reading.rss_bytes > *each.iter().max().unwrap(), "{} vs {each:?}", reading.rss_bytes);
    let diff = reading.rss_bytes.abs_diff(sum) as f64;
    assert!(diff <= sum as f64 * 0.02, "sampler {} bytes vs {sum} summed", reading.rss_bytes);
    assert_eq!(reading.processes, 2);

    // The one-pass reader agrees on the group's shape.
    let usage = read_groups(&[pgid], procfs::page_size()).unwrap();
    assert_eq!(usage[&pgid].processes, 2);

    drop(group);
    // Killed and reaped: the group is gone from the next sample.
    assert!(members(pgid).is_empty());
    assert!(sampler.sample(&[("web.1", pgid)], now()).unwrap().is_empty());
}
