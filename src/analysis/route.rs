//! Route × key pattern: which candidate routes call which patterns, and how much of each route's time is loader
//! time.
//!
//! The [`CandidateLayer`](crate::http::CandidateLayer) runs each request inside a task-local [`RequestScope`]; every
//! registry get made by the request's task adds (pattern, one call, loader nanoseconds) to it, without a lock; when
//! the response is ready the scope is merged into the route's [`RouteCalls`] under that route's own mutex, once per
//! request. Loads run on another task (`tokio::spawn`) are not attributed to the route.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// Most distinct patterns one request records; further ones are not attributed.
const MAX_PATTERNS_PER_REQUEST: usize = 32;

tokio::task_local! {
    /// The request being handled by a candidate route, set by [`CandidateLayer`](crate::http::CandidateLayer).
    pub static ROUTE_SCOPE: RequestScope;
}

/// Cache calls made by one request: (pattern slot, calls, loader nanoseconds).
#[derive(Debug, Default)]
pub struct RequestScope {
    calls: RefCell<Vec<(u32, u64, u64)>>,
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
        });
        let mut snap = routes.snapshot();
        snap.sort_unstable();
        assert_eq!(snap, vec![(1, 2, 150), (2, 1, 0)]);
    }
}
