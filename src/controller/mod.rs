//! The two reconcilers and what they share. Each reconcile is
//! dereference → validate → build → apply → update_status; validate and build are pure.

pub mod policy;
pub mod spice_proxy;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::crd::SpiceProxy;
use crate::metrics::Metrics;

#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("object has no {0}")]
    MissingField(&'static str),
    #[error("the SpiceProxy cache stopped before it was ready")]
    CacheNotReady,
    #[error("could not encode the proxy configuration: {0}")]
    Encode(#[from] serde_json::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of one operator process.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image the proxy Deployments run unless a SpiceProxy overrides it.
    pub proxy_image: String,
}

/// What every reconcile gets.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    /// Every SpiceProxy, as the policy reconciler's lookup table (no API call per reference).
    pub proxies: Store<DeserializeGuard<SpiceProxy>>,
    /// Flips to true once `proxies` holds a complete list. Reconciles wait on this rather than
    /// on `Store::wait_until_ready`, whose one-shot channel keeps only the last waiter's waker:
    /// with two waiters the first one is never woken (a policy once stayed unresolved forever).
    pub proxies_ready: watch::Receiver<bool>,
}

/// Runs both controllers until `shutdown` flips to true. `ready` is set once the caches are synced.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    ready: watch::Sender<bool>,
    shutdown: watch::Receiver<bool>,
) {
    let (proxies, writer) = reflector::store();
    // One reflected stream of SpiceProxies feeds the lookup table and, through the policy
    // controller's mapping, re-resolves every policy that refers to a changed or deleted proxy.
    // The store is written before an event is passed on, so a triggered reconcile sees it.
    let proxy_events = reflector(
        writer,
        watcher(Api::<DeserializeGuard<SpiceProxy>>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects()
    .filter_map(|r| {
        if let Err(error) = &r {
            tracing::warn!(%error, "SpiceProxy watch failed; retrying with backoff");
        }
        futures::future::ready(r.ok())
    });

    let (proxies_ready_tx, proxies_ready) = watch::channel(false);
    let ctx = Arc::new(Context { client, settings, metrics, proxies: proxies.clone(), proxies_ready });
    let stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let spx = spice_proxy::controller(ctx.clone(), stop(shutdown.clone()));
    let ccp = policy::controller(ctx.clone(), proxy_events, stop(shutdown.clone()));
    // The only waiter on the store's own readiness signal; everyone else watches `proxies_ready`.
    let readiness = async move {
        match proxies.wait_until_ready().await {
            Ok(()) => _ = proxies_ready_tx.send(true),
            Err(_) => drop(proxies_ready_tx), // waiters get CacheNotReady instead of hanging
        }
        let _ = ready.send(true);
        futures::future::pending::<()>().await
    };
    tokio::select! {
        _ = futures::future::join(spx, ccp) => {},
        _ = readiness => {},
    }
}

/// Requeue after an error with a short delay; the controller runtime adds its own backoff on
/// repeated trigger failures.
pub(crate) fn retry_after(error: &Error) -> Duration {
    match error {
        Error::Kube(kube::Error::Api(s)) if s.code == 409 => Duration::from_secs(1),
        _ => Duration::from_secs(5),
    }
}
