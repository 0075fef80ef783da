//! The store shared by the gateway's tasks: calls run on the blocking pool, one at a time.

use std::sync::{Arc, Mutex};

use tracing::error;

use super::{Store, StoreError};
use crate::metrics::Metrics;

/// The open store behind one mutex, for async callers. Cheap to clone.
///
/// Everything inside [`SharedStore::call`] runs while every other caller waits (devices'
/// status acknowledgements among them): keep file work and hashing outside it.
#[derive(Clone)]
pub(crate) struct SharedStore {
    inner: Arc<Mutex<Store>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedStore")
    }
}

impl SharedStore {
    /// Wraps an open store.
    pub(crate) fn new(store: Store, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(store)),
            metrics,
        }
    }

    /// Runs `f` with the store on the blocking pool. A failure is logged and counted here, so
    /// callers only decide what it means for their message.
    pub(crate) async fn call<R: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&mut Store) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let inner = self.inner.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut guard = match inner.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            f(&mut guard)
        })
        .await;
        let result = match joined {
            Ok(r) => r,
            Err(e) => Err(StoreError::Task(e.to_string())),
        };
        if let Err(e) = &result {
            Metrics::inc(&self.metrics.store_errors);
            error!(error = %e, what, "store operation failed");
        }
        result
    }
}
