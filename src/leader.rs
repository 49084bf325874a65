//! Leader election on a coordination.k8s.io Lease (kube-lease-manager): of all operator
//! replicas only the holder reconciles; a standby takes over once the holder stops renewing.
//!
//! Safety over liveness: a leader that loses the lease, or cannot tell whether it still holds
//! it, stops reconciling at once and the process exits, so two leaders never write together.
//! Kubernetes restarts it and it rejoins the election as a standby with fresh caches.

use std::future::Future;
use std::sync::Arc;

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Lease timing. A standby may take over `duration_seconds` after the leader's last renewal;
/// the leader renews `grace_seconds` before that.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// Unique per process: the pod name in a cluster.
    pub identity: String,
    pub duration_seconds: u64,
    pub grace_seconds: u64,
}

#[derive(thiserror::Error, Debug)]
pub enum LeaderError {
    #[error("cannot use the leader Lease {namespace}/{name}: {source}")]
    Lease { namespace: String, name: String, source: kube_lease_manager::LeaseManagerError },
    #[error("lost the leader Lease {0}; stopped reconciling, exiting so a fresh process rejoins the election")]
    Lost(String),
}

/// Waits for the lease, then runs `work` until `shutdown` flips (graceful: `work` finishes,
/// the lease is released so a standby takes over at once) or the lease is lost (abrupt:
/// `work` is dropped mid-flight and an error is returned).
pub async fn run_as_leader<F, Fut>(
    client: Client,
    settings: &LeaseSettings,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
    work: F,
) -> Result<(), LeaderError>
where
    F: FnOnce(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()>,
{
    let lease_error = |source| LeaderError::Lease { namespace: settings.namespace.clone(), name: settings.name.clone(), source };
    let manager: Arc<LeaseManager> = Arc::new(
        LeaseManagerBuilder::new(client, &settings.name)
            .with_namespace(&settings.namespace)
            .with_identity(&settings.identity)
            .with_duration(settings.duration_seconds)
            .with_grace(settings.grace_seconds)
            .build()
            .await
            .map_err(lease_error)?,
    );
    let lease = format!("{}/{}", settings.namespace, settings.name);
    tracing::info!(%lease, identity = %settings.identity, "waiting to become the leader");
    loop {
        tokio::select! {
            held = manager.changed() => if held.map_err(lease_error)? { break },
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
    }
    tracing::info!(%lease, identity = %settings.identity, "became the leader; reconciling");
    metrics.leader.set(1);

    let (stop_tx, stop_rx) = watch::channel(false);
    let work = work(stop_rx);
    tokio::pin!(work);
    let outcome = loop {
        tokio::select! {
            _ = &mut work => break Ok(()),
            held = manager.changed() => match held {
                Ok(true) => continue,
                Ok(false) => break Err(LeaderError::Lost(lease.clone())),
                Err(e) => {
                    tracing::error!(%lease, error = %e, "cannot renew the leader Lease");
                    break Err(LeaderError::Lost(lease.clone()));
                }
            },
            _ = shutdown.wait_for(|s| *s) => {
                let _ = stop_tx.send(true);
                (&mut work).await;
                break Ok(());
            }
        }
    };
    metrics.leader.set(0);
    if outcome.is_ok() {
        // Hand over now instead of making the standby wait for the lease to expire.
        if let Err(e) = manager.release().await {
            tracing::warn!(%lease, error = %e, "could not release the leader Lease; a standby takes over when it expires");
        }
    }
    outcome
}
