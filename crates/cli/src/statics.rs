//! The daemon's side of `[static]`: index a built release's static files
//! (`nonstop_proxy::StaticIndex`, persisted inside the release), and keep
//! the proxy serving the files of exactly the live releases the engine
//! names (`nonstop_engine::LiveStatics`). Loading reads files, so it runs
//! on tokio's blocking pool; publications of one app are applied in order
//! and a stale one (overtaken by a newer) is dropped.

use nonstop_core::process::StaticMount;
use nonstop_core::traffic::RouteKey;
use nonstop_engine::LiveStatics;
use nonstop_proxy::{Proxy, StaticIndex, StaticIndexError, StaticRelease};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub(crate) struct StaticPublisher {
    proxy: Proxy,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// The newest publication asked for, per route (an app's environment).
    latest: HashMap<RouteKey, u64>,
    next: u64,
    /// Loaded releases, by release directory, with their mounts. Shared by
    /// the routes that serve the same release (a promoted one); dropped
    /// once no route serves it.
    loaded: HashMap<PathBuf, (Vec<StaticMount>, Arc<StaticRelease>)>,
    /// Which release directories each route serves now.
    serving: HashMap<RouteKey, Vec<PathBuf>>,
}

impl StaticPublisher {
    pub fn new(proxy: Proxy) -> Self {
        Self { proxy, state: Arc::new(Mutex::new(State::default())) }
    }

    /// Index `release`'s static files (blocking). The error names a missing
    /// directory and the fix.
    pub fn index(release: &Path, mounts: &[StaticMount]) -> Result<(), StaticIndexError> {
        let index = StaticIndex::load_or_build(release, mounts)?;
        let files: usize = index.mounts.iter().map(|m| m.files.len()).sum();
        tracing::info!(release = %release.display(), files, "static files indexed");
        Ok(())
    }

    /// Serve the static files of `live` (and no other release) to `route`,
    /// in its order: the first release that has a path wins. Loading runs
    /// on the blocking pool; this returns at once.
    pub fn publish(&self, route: &RouteKey, live: Vec<LiveStatics>) {
        let generation = self.next_generation(route);
        let (state, proxy, route) = (Arc::clone(&self.state), self.proxy.clone(), route.clone());
        let work = move || apply(&state, &proxy, &route, live, generation);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(work);
            }
            Err(_) => work(),
        }
    }

    /// [`StaticPublisher::publish`], returning once the files are served: a
    /// starting daemon does this before its proxy accepts, so that no
    /// request for a static file reaches the app meanwhile.
    pub async fn publish_now(&self, route: &RouteKey, live: Vec<LiveStatics>) {
        let generation = self.next_generation(route);
        let (state, proxy, route) = (Arc::clone(&self.state), self.proxy.clone(), route.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || apply(&state, &proxy, &route, live, generation)).await {
            tracing::warn!("loading the static files failed: {e}");
        }
    }

    fn next_generation(&self, route: &RouteKey) -> u64 {
        let mut state = lock(&self.state);
        state.next += 1;
        let g = state.next;
        state.latest.insert(route.clone(), g);
        g
    }
}

/// Load what is not loaded yet of `live` and serve it to `route`, unless a
/// newer publication than `generation` follows.
fn apply(state: &Mutex<State>, proxy: &Proxy, route: &RouteKey, live: Vec<LiveStatics>, generation: u64) {
    let mut state = lock(state);
    if state.latest.get(route) != Some(&generation) {
        return; // a newer publication follows
    }
    let mut releases = Vec::new();
    let mut serving = Vec::new();
    for l in live {
        let cached = state.loaded.get(&l.dir).filter(|(m, _)| *m == l.mounts).map(|(_, r)| Arc::clone(r));
        let release = match cached {
            Some(r) => r,
            None => match StaticIndex::load_or_build(&l.dir, &l.mounts) {
                Ok(index) => {
                    let r = Arc::new(StaticRelease::load(l.release.0, &l.dir, &index));
                    tracing::info!(route = %route.0, release = %l.release, files = r.files(), cached_bytes = r.cached_bytes(), "static files loaded");
                    state.loaded.insert(l.dir.clone(), (l.mounts.clone(), Arc::clone(&r)));
                    r
                }
                Err(e) => {
                    tracing::warn!(route = %route.0, release = %l.release, "static files of this release are not served: {e}");
                    continue;
                }
            },
        };
        serving.push(l.dir);
        releases.push(release);
    }
    if serving.is_empty() {
        state.serving.remove(route);
    } else {
        state.serving.insert(route.clone(), serving);
    }
    let State { loaded, serving, .. } = &mut *state;
    loaded.retain(|dir, _| serving.values().flatten().any(|d| d == dir));
    proxy.set_static_releases(route, releases);
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}
