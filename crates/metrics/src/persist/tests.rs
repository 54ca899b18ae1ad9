use super::*;
use crate::key::StatusClass;
use nonstop_core::ReleaseId;
use proptest::prelude::*;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const T0: u64 = 1_767_225_600_000;
fn at(secs: u64) -> Timestamp {
    Timestamp::from_millis(T0 + secs * 1000)
}
fn app() -> AppName {
    AppName::new("blog").unwrap()
}
fn env() -> EnvironmentId {
    EnvironmentId::new("production").unwrap()
}
fn web() -> ProcessName {
    ProcessName::new("web").unwrap()
}

/// A store with every kind, gaps, several releases and slots.
fn sample_store() -> Store {
    let mut store = Store::new(Limits::default());
    let requests = SeriesKey::process(app(), env(), web(), Metric::Requests).with_release(ReleaseId(4));
    let errors = requests.clone().with_metric(Metric::Responses(StatusClass::ServerError));
    let latency = requests.clone().with_metric(Metric::Latency);
    let statics = SeriesKey::environment(app(), env(), Metric::StaticHits);
    for i in 0..900u64 {
        if i % 97 == 13 {
            continue; // a gap
        }
        let t = at(i * 5);
        store.count(&requests, t, i % 11).unwrap();
        store.count(&errors, t, u64::from(i % 50 == 0)).unwrap();
        store.count(&statics, t, 3).unwrap();
        for slot in 1..=2 {
            let cpu = SeriesKey::instance(app(), env(), web(), slot, Metric::CpuPercent);
            store.gauge(&cpu, t, (i as f64) * 0.37 + f64::from(slot)).unwrap();
            store.gauge(&cpu.clone().with_metric(Metric::RssBytes), t, 50e6 + i as f64).unwrap();
        }
        let mut h = Histogram::new();
        for k in 0..(i % 5) {
            h.observe(Duration::from_micros(150 + k * 7_919 * (i % 13)));
        }
        store.histogram(&latency, t, &h).unwrap();
    }
    store
}

#[test]
fn encode_decode_is_identity() {
    let store = sample_store();
    let bytes = encode(&store);
    let back = decode(&bytes, &Limits::default()).unwrap();
    assert_eq!(back, store);
    assert_eq!(encode(&back), bytes);
    // Compact: a handful of bytes per point.
    let points: usize = store
        .series
        .values()
        .map(|s| match &s.data {
            Data::Counter { fine, coarse, .. } => fine.len() + coarse.len(),
            Data::Gauge { fine, coarse, .. } => fine.len() + coarse.len(),
            Data::Histogram { fine, coarse, .. } => fine.len() + coarse.len(),
        })
        .sum();
    assert!(bytes.len() < points * 16, "{} bytes for {points} points", bytes.len());
    assert!((bytes.len() as u64) <= max_file_bytes(&Limits::default()));
}

#[test]
fn save_then_load_gives_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics");
    let store = sample_store();
    let written = save(&store, &metrics).unwrap();
    let path = metrics.join(FILE_NAME);
    assert_eq!(fs::metadata(&path).unwrap().len(), written);
    assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(fs::metadata(&metrics).unwrap().permissions().mode() & 0o777, 0o700);
    assert!(!metrics.join(format!("{FILE_NAME}.tmp")).exists());
    let loaded = load(&metrics, Limits::default(), at(0));
    assert!(loaded.problem.is_none(), "{:?}", loaded.problem);
    assert_eq!(loaded.store, store);
    // Saving again replaces it.
    let mut more = store.clone();
    more.gauge(&SeriesKey::process(app(), env(), web(), Metric::Instances), at(10_000), 2.0).unwrap();
    save(&more, &metrics).unwrap();
    assert_eq!(load(&metrics, Limits::default(), at(0)).store, more);
}

#[test]
fn no_file_is_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = load(&dir.path().join("nowhere"), Limits::default(), at(0));
    assert!(loaded.problem.is_none());
    assert!(loaded.store.is_empty());
}

fn load_damaged(bytes: &[u8]) -> (tempfile::TempDir, Loaded) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(FILE_NAME), bytes).unwrap();
    let loaded = load(dir.path(), Limits::default(), at(7));
    (dir, loaded)
}

#[test]
fn a_damaged_file_is_set_aside_and_reported() {
    let good = encode(&sample_store());
    let mut flipped = good.clone();
    let i = flipped.len() / 2;
    flipped[i] ^= 0x40;
    let mut newer = good.clone();
    newer[8..10].copy_from_slice(&2u16.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("flipped bit", flipped, "checksum does not match"),
        ("truncated", good[..good.len() - 100].to_vec(), "truncated"),
        ("header only", good[..10].to_vec(), "truncated"),
        ("empty", Vec::new(), "not a nonstop metrics file"),
        ("garbage", b"{\"json\": true}\n".to_vec(), "not a nonstop metrics file"),
        ("newer", newer, "format version 2, newer than this nonstop reads (up to 1)"),
    ];
    for (what, bytes, says) in cases {
        let (dir, loaded) = load_damaged(&bytes);
        assert!(loaded.store.is_empty(), "{what}");
        let problem = loaded.problem.unwrap_or_else(|| panic!("{what}: no problem reported"));
        let message = problem.to_string();
        assert!(message.contains(says), "{what}: {message}");
        let LoadError::SetAside { moved_to, .. } = &problem else { panic!("{what}: {problem:?}") };
        assert!(!dir.path().join(FILE_NAME).exists(), "{what}");
        assert_eq!(fs::read(moved_to).unwrap(), bytes, "{what}: moved intact");
        let name = moved_to.file_name().unwrap().to_str().unwrap();
        let expected = if what == "newer" { "metrics.bin.newer-v2-" } else { "metrics.bin.damaged-" };
        assert!(name.starts_with(expected), "{what}: {name}");
        assert!(message.contains("metrics start empty"), "{message}");
        // The next start finds no file and no problem.
        assert!(load(dir.path(), Limits::default(), at(8)).problem.is_none());
    }
}

#[test]
fn a_file_too_large_for_the_limits_is_set_aside_unread() {
    let limits = Limits { max_series: 1, max_histogram_series: 0, stale_after: Duration::from_secs(60) };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let size = max_file_bytes(&limits) + 1000;
    fs::write(&path, vec![0u8; size as usize]).unwrap();
    let loaded = load(dir.path(), limits, at(0));
    let Some(LoadError::SetAside { source: DecodeError::TooLarge { size: s, .. }, .. }) = loaded.problem else {
        panic!("{:?}", loaded.problem)
    };
    assert_eq!(s, size);
}

#[test]
fn an_unreadable_file_is_reported_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = dir.path().join("elsewhere");
    fs::write(&elsewhere, encode(&sample_store())).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dir.path().join(FILE_NAME)).unwrap();
    let loaded = load(dir.path(), Limits::default(), at(0));
    let Some(LoadError::Read { .. }) = &loaded.problem else { panic!("{:?}", loaded.problem) };
    assert!(loaded.store.is_empty());
    assert!(fs::symlink_metadata(dir.path().join(FILE_NAME)).unwrap().file_type().is_symlink());
    // And a save does not write through the link either: it replaces it.
    save(&Store::new(Limits::default()), dir.path()).unwrap();
    assert!(!fs::symlink_metadata(dir.path().join(FILE_NAME)).unwrap().file_type().is_symlink());
    assert_eq!(fs::read(&elsewhere).unwrap(), encode(&sample_store()));
}

#[test]
fn a_save_into_an_unwritable_place_says_where() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    fs::write(&file, b"").unwrap();
    let err = save(&Store::new(Limits::default()), &file.join("metrics")).unwrap_err();
    assert_eq!(err.step, SaveStep::CreateDir);
    assert!(err.to_string().contains("cannot save metrics: create the directory"), "{err}");
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn only_the_newest_files_set_aside_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..6u64 {
        fs::write(dir.path().join(FILE_NAME), b"damaged").unwrap();
        let loaded = load(dir.path(), Limits::default(), at(i));
        assert!(matches!(loaded.problem, Some(LoadError::SetAside { .. })));
    }
    let mut names: Vec<String> =
        fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    let expected: Vec<String> = (3..6).map(|i| format!("metrics.bin.damaged-{}", at(i).as_millis())).collect();
    assert_eq!(names, expected);
}

#[test]
fn lower_limits_keep_the_most_recent_series() {
    // Series beyond the caps are left out, the least recently sampled first.
    let mut small = Store::new(Limits::default());
    let old = SeriesKey::process(app(), env(), web(), Metric::Instances);
    let new = SeriesKey::process(app(), env(), web(), Metric::QueueDepth);
    let newest = SeriesKey::environment(app(), env(), Metric::StaticHits);
    small.gauge(&old, at(0), 1.0).unwrap();
    small.gauge(&new, at(10), 1.0).unwrap();
    small.count(&newest, at(20), 1).unwrap();
    let limits = Limits { max_series: 2, max_histogram_series: 0, stale_after: Duration::from_secs(60) };
    let back = decode(&encode(&small), &limits).unwrap();
    assert_eq!(back.keys().collect::<Vec<_>>().len(), 2);
    assert!(back.current(&old).is_none());
    assert_eq!(back.evicted_series(), 1);
}

#[test]
fn a_full_store_stays_within_the_file_bound() {
    let limits = Limits { max_series: 3, max_histogram_series: 1, stale_after: Duration::from_secs(60) };
    let mut store = Store::new(limits);
    let counter =
        SeriesKey::instance(app(), env(), web(), u32::MAX, Metric::Requests).with_release(ReleaseId(u64::MAX));
    let gauge = counter.clone().with_metric(Metric::RssBytes);
    let latency = counter.clone().with_metric(Metric::Latency);
    let mut h = Histogram::new();
    for i in 0..BUCKETS {
        let bound = Histogram::bound(i).unwrap_or(Duration::from_secs(100));
        for _ in 0..3 {
            h.observe(bound);
        }
    }
    // A day and more of points, every one of them full.
    for i in 0..(86_400 / 5 + 100) {
        let t = at(i * 5);
        store.count(&counter, t, u64::MAX / 4).unwrap();
        store.gauge(&gauge, t, f64::MAX / 1e10).unwrap();
        store.histogram(&latency, t, &h).unwrap();
    }
    let bytes = encode(&store);
    assert!((bytes.len() as u64) <= max_file_bytes(&limits), "{} > {}", bytes.len(), max_file_bytes(&limits));
    assert_eq!(decode(&bytes, &limits).unwrap(), store);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Damage anywhere in the body, with a checksum that matches it (so
    /// the parser itself is exercised), is an error or a valid store,
    /// never a panic.
    #[test]
    fn damaged_bodies_never_panic(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), cut in any::<prop::sample::Index>()) {
        let mut store = Store::new(Limits::default());
        let key = SeriesKey::instance(app(), env(), web(), 1, Metric::CpuPercent);
        let lat = SeriesKey::process(app(), env(), web(), Metric::Latency);
        let mut h = Histogram::new();
        h.observe(Duration::from_millis(3));
        for i in 0..30 {
            store.gauge(&key, at(i * 5), 1.5).unwrap();
            store.histogram(&lat, at(i * 5), &h).unwrap();
        }
        let good = encode(&store);
        let mut body = good[HEADER_LEN..].to_vec();
        for (i, b) in edits {
            let i = i.index(body.len());
            body[i] = b;
        }
        if cut.index(4) == 0 {
            body.truncate(cut.index(body.len()));
        }
        let mut bytes = good[..HEADER_LEN].to_vec();
        bytes[12..20].copy_from_slice(&(body.len() as u64).to_le_bytes());
        bytes[20..24].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        if let Ok(back) = decode(&bytes, &Limits::default()) {
            prop_assert!(back.len() <= Limits::default().max_series);
        }
    }
}
