//! Route × key pattern: which candidate routes call which patterns, and how much of each route's time is loader
//! time.
//!
//! The [`CandidateLayer`](crate::http::CandidateLayer) runs each request inside a task-local [`RequestScope`]; every
//! registry get made by the request's task adds (pattern, one call, loader nanoseconds) to it, without a lock; when
//! the response is ready the scope is merged into the route's [`RouteCalls`] under that route's own mutex, once per
//! request. Loads run on another task (`tokio::spawn`) are not attributed to the route.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// Most distinct patterns one request records; further ones are not attributed.
const MAX_PATTERNS_PER_REQUEST: usize = 32;

tokio::task_local! {
    /// The request being handled by a candidate route, set by [`CandidateLayer`](crate::http::CandidateLayer).
    pub static ROUTE_SCOPE: RequestScope;
}

/// Cache calls made by one request: (pattern slot, calls, loader nanoseconds), and how its routed calls ended
/// (for the response's `Cache-Status`).
#[derive(Debug, Default)]
pub struct RequestScope {
    calls: RefCell<Vec<(u32, u64, u64)>>,
    outcomes: Cell<Outcomes>,
}

/// How the routed calls (shadow or serve) of one request ended, summed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcomes {
    /// Calls in shadow mode (the loader answered).
    pub(crate) bypassed: u32,
    /// Fresh hits.
    pub(crate) hits: u32,
    /// Stale-while-revalidate answers.
    pub(crate) revalidating: u32,
    /// Stale-if-error answers.
    pub(crate) stale_on_error: u32,
    /// Calls whose loader ran (a miss).
    pub(crate) misses: u32,
    /// Of the misses, those that found an entry past its TTL.
    pub(crate) refreshed: u32,
    /// Calls answered by another caller's load.
    pub(crate) collapsed: u32,
    /// Some miss stored its value.
    pub(crate) stored: bool,
    /// The least remaining freshness (seconds, negative when stale) of the entries served.
    pub(crate) ttl_secs: Option<i64>,
}

impl RequestScope {
    /// How the request's routed calls ended; `None` when it made no cache call at all, and all zeros when its calls
    /// were only observed.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    pub(crate) fn outcomes(&self) -> Option<Outcomes> {
        let o = self.outcomes.get();
        (o != Outcomes::default() || !self.calls.borrow().is_empty()).then_some(o)
    }
}

/// Records how one routed call ended in the current request's scope, if there is one.
pub(crate) fn record_outcome(outcome: crate::registry::Outcome) {
    use crate::registry::CacheStatus as S;
    let _ = ROUTE_SCOPE.try_with(|s| {
        let mut o = s.outcomes.get();
        match outcome.status {
            S::Bypass => o.bypassed += 1,
            S::Hit => o.hits += 1,
            S::Collapsed => o.collapsed += 1,
            S::Miss { refreshed, stored } => {
                o.misses += 1;
                o.refreshed += u32::from(refreshed);
                o.stored |= stored;
            }
            S::StaleWhileRevalidate => o.revalidating += 1,
            S::StaleIfError => o.stale_on_error += 1,
        }
        if let Some(ttl) = outcome.read().and_then(|(stamp, now)| stamp.ttl_secs(now)) {
            o.ttl_secs = Some(o.ttl_secs.map_or(ttl, |t| t.min(ttl)));
        }
        s.outcomes.set(o);
    });
}

impl RequestScope {
    /// An empty scope (allocates nothing until a call is recorded).
    pub fn new() -> Self {
        RequestScope::default()
    }
}

/// Records one cache get of the pattern in slot `tag` that spent `loader_nanos` in its loader (0 for a hit), in the
/// current request's scope if there is one.
#[inline]
pub(crate) fn record_call(tag: u32, loader_nanos: u64) {
    let _ = ROUTE_SCOPE.try_with(|s| {
        let mut calls = s.calls.borrow_mut();
        if let Some(c) = calls.iter_mut().find(|c| c.0 == tag) {
            c.1 += 1;
            c.2 += loader_nanos;
        } else if calls.len() < MAX_PATTERNS_PER_REQUEST {
            calls.push((tag, 1, loader_nanos));
        }
    });
}

/// Per route: pattern slot → (calls, loader nanoseconds), summed over its requests.
#[derive(Debug, Default)]
pub(crate) struct RouteCalls {
    cells: Mutex<HashMap<u32, (u64, u64)>>,
}

impl RouteCalls {
    /// Adds a finished request's calls.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    pub(crate) fn merge(&self, scope: RequestScope) {
        let calls = scope.calls.into_inner();
        if calls.is_empty() {
            return;
        }
        let mut cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        for (tag, n, nanos) in calls {
            let c = cells.entry(tag).or_default();
            c.0 += n;
            c.1 += nanos;
        }
    }

    /// (pattern slot, calls, loader nanoseconds).
    pub(crate) fn snapshot(&self) -> Vec<(u32, u64, u64)> {
        self.cells
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(&t, &(n, ns))| (t, n, ns))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_are_attributed_inside_a_scope_only() {
        record_call(1, 5); // no scope: ignored
        let routes = RouteCalls::default();
        let scope = ROUTE_SCOPE
            .scope(RequestScope::new(), async {
                record_call(1, 100);
                record_call(2, 0);
                record_call(1, 50);
                ROUTE_SCOPE.with(|s| s.calls.borrow().clone())
            })
            .await;
        routes.merge(RequestScope {
            calls: RefCell::new(scope),
            outcomes: Cell::default(),
        });
        let mut snap = routes.snapshot();
        snap.sort_unstable();
        assert_eq!(snap, vec![(1, 2, 150), (2, 1, 0)]);
    }
}
