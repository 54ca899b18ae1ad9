//! What a daemon that (re)starts beside a running data plane does with the
//! data plane's backend table: a pure decision, no I/O.
//!
//! While its engine restores the app, the daemon's remote traffic layer
//! collects the backends the engine adds (the web instances it re-adopts;
//! [`Adopted`]) instead of sending them, and sends drains and removals at
//! once (remembering them in `touched`). Once the engine has restored,
//! [`decide`] compares that with the data plane's table (read then):
//!
//! - a backend the engine adopted that the data plane holds with the same
//!   address, route and health check, and does not drain, is **kept** as
//!   it is: its health is the data plane's (no reset to pending; it went on
//!   being checked while no daemon ran), and the engine is told that health;
//! - one the data plane does not hold, or holds differently (another
//!   address: a new instance under the same id cannot be, but a changed
//!   check can), or drains, is **added** (replacing what was there);
//! - a backend of the table that the engine neither adopted nor drained or
//!   removed during the restore belongs to an instance that is gone (it
//!   exited, or its record was forgotten): it is **removed**. One the engine
//!   drains or removed meanwhile is left to that.

use super::wire::PlaneBackend;
use nonstop_core::process::HealthCheck;
use nonstop_core::traffic::{Backend, BackendHealth, InitialHealth, RouteKey};
use nonstop_core::InstanceId;
use std::collections::{BTreeMap, BTreeSet};

/// A backend the engine added during its restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    pub route: RouteKey,
    pub backend: Backend,
    pub check: HealthCheck,
    pub initial: InitialHealth,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Leave it in the data plane as it is; its health there is `health`.
    Keep { instance: InstanceId, health: BackendHealth },
    /// Add it (replacing a different backend under the same id).
    Add(Adopted),
    /// Forget it: its instance is gone.
    Remove(InstanceId),
}

impl Action {
    #[cfg(test)]
    pub fn instance(&self) -> &InstanceId {
        match self {
            Action::Keep { instance, .. } | Action::Remove(instance) => instance,
            Action::Add(a) => &a.backend.instance,
        }
    }
}

/// The actions, one per instance, in instance order. Of two adoptions of
/// one instance the later counts (as a second `add` replaces the first).
pub fn decide(table: &[PlaneBackend], adopted: &[Adopted], touched: &BTreeSet<InstanceId>) -> Vec<Action> {
    let held: BTreeMap<&InstanceId, &PlaneBackend> = table.iter().map(|b| (&b.backend.instance, b)).collect();
    let wanted: BTreeMap<&InstanceId, &Adopted> = adopted.iter().map(|a| (&a.backend.instance, a)).collect();
    let mut actions = Vec::new();
    let ids: BTreeSet<&InstanceId> = held.keys().chain(wanted.keys()).copied().collect();
    for id in ids {
        match (wanted.get(id), held.get(id)) {
            (Some(a), Some(b))
                if b.backend.addr == a.backend.addr
                    && b.route == a.route
                    && b.check == a.check
                    && b.health() != BackendHealth::Draining =>
            {
                actions.push(Action::Keep { instance: id.clone(), health: b.health() })
            }
            (Some(a), _) => actions.push(Action::Add((*a).clone())),
            (None, Some(_)) if touched.contains(id) => {}
            (None, Some(_)) => actions.push(Action::Remove(id.clone())),
            (None, None) => {}
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plane::wire::tests::{check, id};
    use nonstop_core::traffic::BackendStatus;
    use proptest::prelude::*;

    fn held(i: &str, port: u16, health: BackendHealth) -> PlaneBackend {
        let backend = Backend { instance: id(i), addr: format!("127.0.0.1:{port}").parse().unwrap() };
        PlaneBackend {
            route: RouteKey("app/default".into()),
            status: BackendStatus {
                instance: backend.instance.clone(),
                addr: backend.addr,
                health,
                in_flight: 0,
                last_checks: vec![],
            },
            backend,
            check: check(),
        }
    }

    fn adopted(i: &str, port: u16, initial: InitialHealth) -> Adopted {
        Adopted {
            route: RouteKey("app/default".into()),
            backend: Backend { instance: id(i), addr: format!("127.0.0.1:{port}").parse().unwrap() },
            check: check(),
            initial,
        }
    }

    #[test]
    fn adopted_instances_keep_the_data_planes_health_and_gone_ones_leave() {
        let table = vec![
            held("web.1#1", 5001, BackendHealth::Healthy),
            held("web.2#2", 5002, BackendHealth::Unhealthy),
            held("web.3#3", 5003, BackendHealth::Healthy),
        ];
        // web.1 and web.2 re-adopted (web.2 was healthy when recorded: the
        // data plane knows better); web.3 died while no daemon ran; web.4
        // is new.
        let adopted = vec![
            adopted("web.1#1", 5001, InitialHealth::AssumeHealthy),
            adopted("web.2#2", 5002, InitialHealth::AssumeHealthy),
            adopted("web.4#4", 5004, InitialHealth::Pending),
        ];
        assert_eq!(
            decide(&table, &adopted, &BTreeSet::new()),
            vec![
                Action::Keep { instance: id("web.1#1"), health: BackendHealth::Healthy },
                Action::Keep { instance: id("web.2#2"), health: BackendHealth::Unhealthy },
                Action::Remove(id("web.3#3")),
                Action::Add(adopted[2].clone()),
            ]
        );
    }

    #[test]
    fn a_different_or_draining_backend_is_replaced_and_a_drained_one_left_alone() {
        let mut other_check = held("web.2#2", 5002, BackendHealth::Healthy);
        other_check.check.path = "/other".into();
        let table = vec![
            held("web.1#1", 5001, BackendHealth::Healthy),
            other_check,
            held("web.3#3", 5003, BackendHealth::Draining),
            held("web.5#5", 5005, BackendHealth::Draining),
        ];
        let adopted = vec![
            adopted("web.1#1", 6001, InitialHealth::AssumeHealthy),
            adopted("web.2#2", 5002, InitialHealth::AssumeHealthy),
            adopted("web.3#3", 5003, InitialHealth::AssumeHealthy),
        ];
        let touched: BTreeSet<InstanceId> = [id("web.5#5")].into();
        let actions = decide(&table, &adopted, &touched);
        assert_eq!(
            actions,
            vec![Action::Add(adopted[0].clone()), Action::Add(adopted[1].clone()), Action::Add(adopted[2].clone()),]
        );
    }

    fn arb_health() -> impl Strategy<Value = BackendHealth> {
        prop_oneof![
            Just(BackendHealth::Pending),
            Just(BackendHealth::Healthy),
            Just(BackendHealth::Unhealthy),
            Just(BackendHealth::Draining),
        ]
    }

    proptest! {
        /// Whatever the table and the adoptions: one action per instance at
        /// most; after applying them the data plane holds exactly the
        /// adopted instances plus those the engine itself drains or removed
        /// (no duplicate, nothing stale, nothing adopted missing), each
        /// adopted one with the address, route and check the engine asked
        /// for; a kept backend keeps the health the data plane had.
        #[test]
        fn the_table_ends_as_the_engine_wants_it(
            table in proptest::collection::vec((0u32..8, 0u16..3, arb_health(), any::<bool>()), 0..8),
            adoptions in proptest::collection::vec((0u32..8, 0u16..3, any::<bool>(), any::<bool>()), 0..10),
            touched in proptest::collection::btree_set(0u32..8, 0..4),
        ) {
            let name = |slot: u32| format!("web.{slot}#{}", slot + 100);
            let mut plane: BTreeMap<InstanceId, PlaneBackend> = BTreeMap::new();
            for (slot, port, health, other_path) in &table {
                let mut b = held(&name(*slot), 5000 + port, *health);
                if *other_path { b.check.path = "/other".into(); }
                plane.insert(b.backend.instance.clone(), b);
            }
            let table: Vec<PlaneBackend> = plane.values().cloned().collect();
            let adopted: Vec<Adopted> = adoptions
                .iter()
                .map(|(slot, port, healthy, other_path)| {
                    let mut a = adopted(
                        &name(*slot),
                        5000 + port,
                        if *healthy { InitialHealth::AssumeHealthy } else { InitialHealth::Pending },
                    );
                    if *other_path { a.check.path = "/other".into(); }
                    a
                })
                .collect();
            let touched: BTreeSet<InstanceId> = touched.iter().map(|s| id(&name(*s))).collect();
            let actions = decide(&table, &adopted, &touched);

            let mut seen = BTreeSet::new();
            for a in &actions {
                prop_assert!(seen.insert(a.instance().clone()), "two actions for {}", a.instance());
            }
            let last: BTreeMap<InstanceId, Adopted> =
                adopted.iter().map(|a| (a.backend.instance.clone(), a.clone())).collect();
            for a in &actions {
                match a {
                    Action::Keep { instance, health } => {
                        let was = &plane[instance];
                        prop_assert_eq!(was.health(), *health);
                        prop_assert!(*health != BackendHealth::Draining);
                        let want = &last[instance];
                        prop_assert_eq!(was.backend.addr, want.backend.addr);
                        prop_assert_eq!(&was.check, &want.check);
                    }
                    Action::Add(want) => {
                        plane.insert(want.backend.instance.clone(), PlaneBackend {
                            route: want.route.clone(),
                            backend: want.backend.clone(),
                            check: want.check.clone(),
                            status: held(&want.backend.instance.to_string(), want.backend.addr.port(), BackendHealth::Pending).status,
                        });
                    }
                    Action::Remove(instance) => {
                        prop_assert!(plane.remove(instance).is_some(), "removed {} that was not there", instance);
                    }
                }
            }
            let expected: BTreeSet<InstanceId> = last
                .keys()
                .cloned()
                .chain(table.iter().map(|b| b.backend.instance.clone()).filter(|i| touched.contains(i)))
                .collect();
            let now: BTreeSet<InstanceId> = plane.keys().cloned().collect();
            prop_assert_eq!(now, expected);
            for (instance, want) in &last {
                let b = &plane[instance];
                prop_assert_eq!(b.backend.addr, want.backend.addr);
                prop_assert_eq!(&b.check, &want.check);
                prop_assert_eq!(&b.route, &want.route);
            }
        }
    }
}
