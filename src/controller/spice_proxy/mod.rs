//! SpiceProxy reconciler: runs the built-in proxy as ConfigMap + key Secret + Deployment +
//! Service + PodDisruptionBudget + egress NetworkPolicy owned by the SpiceProxy, and publishes
//! the URL clients use once it is Ready.
//!
//! Each reconcile (here): `build::validate` the spec → check that the Secrets it mounts exist →
//! `build::build` the children → `apply` them → `status` from what was applied and read back →
//! write the status if it changed. `build` and `status` are pure and unit-tested in `tests`; `pods` says
//! what holds the pods up.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, HTTPGetAction, Node, Pod, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource, SecurityContext,
    Service, ServicePort, ServiceSpec as K8sServiceSpec, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec as K8sNetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, reflector};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::{Context, Error, Result, backoff_key, publish_transitions, retry_after_failure, status_patch_params, trigger};
use crate::conditions;
use crate::crd::{AuthMode, CLIENT_SEND_BUFFER_MAX, DEAD_PEER_MAX_SECONDS, DEAD_PEER_MIN_SECONDS, IpFamilyPolicy, ServiceType, SpiceProxy, SpiceProxySpec, SpiceProxyStatus, TrafficPolicy};
use crate::labels;
use crate::listener::ANY;
use crate::managed_fields;
use crate::metrics::ControllerLabel;
use crate::proxy::config::{self as pc, AllowedTarget, ProxyConfig};
use crate::proxy::proxy_protocol::ProxyProtocolConfig;
use crate::resolve::{UrlError, validate_host};

mod apply;
mod build;
mod pods;
mod status;
#[cfg(test)]
mod tests;

pub use apply::*;
pub use build::*;
pub use pods::*;
pub use status::*;

const LABEL: ControllerLabel = ControllerLabel { controller: "spiceproxy" };

pub async fn controller(ctx: Arc<Context>, shutdown: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let (store, writer) = reflector::store();
    let proxies = reflector(writer, watcher(Api::<DeserializeGuard<SpiceProxy>>::all(client.clone()), watcher::Config::default()));
    // Only spec changes (a new generation) or a new object: the reconciler's own status writes
    // would otherwise trigger a second reconcile each, which has nothing left to do.
    let changed = proxies.applied_objects().predicate_filter(predicates::generation, Default::default());
    Controller::for_stream(trigger(changed, "SpiceProxy".into(), ctx.metrics.clone(), &shutdown), store)
        .owns_stream(owned_changes::<Deployment>(&ctx, &shutdown))
        .owns_stream(owned_changes::<Service>(&ctx, &shutdown))
        .owns_stream(owned_changes::<ConfigMap>(&ctx, &shutdown))
        .owns_stream(owned_changes::<PodDisruptionBudget>(&ctx, &shutdown))
        .owns_stream(owned_changes::<NetworkPolicy>(&ctx, &shutdown))
        .watches_stream(pod_changes(&ctx, &shutdown), |pod| {
            // Pods belong to ReplicaSets, not to the SpiceProxy: its name is in their labels.
            Some(ObjectRef::new(pod.labels().get(labels::INSTANCE)?).within(&pod.namespace()?))
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "spiceproxy reconcile trigger");
            }
        })
        .await;
}

/// Changes to one kind of child (their metadata is all a trigger needs), until shutdown.
fn owned_changes<K>(ctx: &Context, shutdown: &watch::Receiver<bool>) -> impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let owned = watcher::Config::default().labels(&format!("{}={}", labels::MANAGED_BY, labels::FIELD_MANAGER));
    let changes = watcher(Api::<PartialObjectMeta<K>>::all(ctx.client.clone()), owned).touched_objects();
    trigger(changes, K::kind(&()).into_owned(), ctx.metrics.clone(), shutdown)
}

/// Changes to proxy pods (their metadata is enough to trigger), until shutdown: a pod that
/// cannot be scheduled or started changes nothing on the Deployment, so without this its
/// SpiceProxy would not learn why it stays unready.
fn pod_changes(ctx: &Context, shutdown: &watch::Receiver<bool>) -> impl Stream<Item = Result<PartialObjectMeta<Pod>, watcher::Error>> + Send + 'static {
    let all_proxy_pods = watcher::Config::default().labels(&labels::all_proxy_pods_selector());
    let changes = watcher(Api::<PartialObjectMeta<Pod>>::all(ctx.client.clone()), all_proxy_pods).touched_objects();
    trigger(changes, "Pod".into(), ctx.metrics.clone(), shutdown)
}

fn error_policy(obj: Arc<DeserializeGuard<SpiceProxy>>, error: &Error, ctx: Arc<Context>) -> Action {
    retry_after_failure(&obj, error, &ctx, &LABEL)
}

async fn reconcile(guard: Arc<DeserializeGuard<SpiceProxy>>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciles.get_or_create(&LABEL).inc();
    let started = Instant::now();
    let result = match &guard.0 {
        Ok(spx) => reconcile_valid(spx, &ctx).await,
        Err(invalid) => report_undecodable(invalid, &ctx).await,
    };
    ctx.metrics.duration.get_or_create(&LABEL).observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.backoff.succeeded(&backoff_key(guard.as_ref()));
    }
    result
}

/// An object the operator cannot even decode (e.g. written before a schema change): say so in
/// its status instead of breaking the watch for every other SpiceProxy.
async fn report_undecodable(invalid: &kube::core::error_boundary::InvalidObject, ctx: &Context) -> Result<Action> {
    let (Some(name), Some(ns)) = (&invalid.metadata.name, &invalid.metadata.namespace) else {
        return Ok(Action::await_change());
    };
    let cond = conditions::new("Ready", false, "InvalidSpec", format!("cannot decode the object: {}", invalid.error), invalid.metadata.generation);
    let api: Api<DeserializeGuard<SpiceProxy>> = Api::namespaced(ctx.client.clone(), ns);
    let patch = json!({"status": {"conditions": [cond], "observedGeneration": invalid.metadata.generation}});
    api.patch_status(name, &status_patch_params(), &Patch::Merge(patch)).await?;
    Ok(Action::await_change())
}

async fn reconcile_valid(spx: &SpiceProxy, ctx: &Context) -> Result<Action> {
    let ns = spx.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let name = spx.name_any();
    let api: Api<SpiceProxy> = Api::namespaced(ctx.client.clone(), &ns);

    // validate: nothing is applied for an invalid spec, so nothing running is half-changed.
    if let Err(problems) = validate(&spx.spec) {
        let status = invalid_status(spx, &problems.join("; "));
        return update_status(&api, spx, status, ctx).await;
    }

    // dereference: a pod that mounts a Secret which does not exist waits in ContainerCreating,
    // and neither it nor its Deployment says why; so nothing is applied until the Secret exists.
    let missing = missing_secrets(&ctx.client, &ns, &spx.spec).await?;
    if !missing.is_empty() {
        let live = match live_children(&ctx.client, &ns, &name, spx.metadata.uid.as_deref()).await? {
            Some((deploy, svc)) => Some((deploy, svc, node_address(spx, &ctx.client).await?)),
            None => None,
        };
        let status = secrets_missing_status(spx, &missing.join("; "), live.as_ref().map(|(d, s, n)| (d, s, n.as_deref())));
        update_status(&api, spx, status, ctx).await?;
        // Secrets are not watched (the operator may not list them): look again shortly.
        return Ok(Action::requeue(SECRET_RECHECK));
    }

    // build (pure) → apply
    let owner = spx.controller_owner_ref(&()).ok_or(Error::MissingField("metadata.uid"))?;
    let image = spx.spec.image.clone().unwrap_or_else(|| ctx.settings.proxy_image.clone());
    let children = build(spx, &image)?;
    let applied = async {
        // A SpiceProxy never reconciled has no children to read back after a restart.
        let reconciled_before = spx.status.as_ref().is_some_and(|s| s.observed_generation.is_some());
        let (deploy, svc) = apply(children, &owner, &ns, &name, reconciled_before, ctx).await?;
        Ok::<_, Error>((deploy, svc, node_address(spx, &ctx.client).await?))
    };
    let (deploy, svc, node_address) = match applied.await {
        Ok(applied) => applied,
        // Say in status why nothing (more) could be done, e.g. a missing RBAC rule or an
        // object the API server rejects, then retry with backoff.
        Err(Error::Kube(kube::Error::Api(e))) if e.code != 409 => {
            let status = apply_failed_status(spx, &e);
            let _ = update_status(&api, spx, status, ctx).await;
            return Err(Error::Kube(kube::Error::Api(e)));
        }
        Err(e) => return Err(e),
    };

    // While the rollout is incomplete, its pods say why (their changes trigger a reconcile).
    let pods = if rolled_out(spx, &deploy) { PodDiagnosis::NothingWrong } else { diagnose(&ctx.client, &ns, &name).await };

    // update_status, from what the apply returned
    let status = build_status(spx, &deploy, &svc, node_address.as_deref(), &pods);
    update_status(&api, spx, status, ctx).await
}

async fn update_status(api: &Api<SpiceProxy>, spx: &SpiceProxy, mut status: SpiceProxyStatus, ctx: &Context) -> Result<Action> {
    let previous = spx.status.clone().unwrap_or_default();
    status.conditions = conditions::merge(&previous.conditions, status.conditions);
    if status != previous {
        let patch = json!({"status": status});
        api.patch_status(&spx.name_any(), &status_patch_params(), &Patch::Merge(patch)).await?;
        publish_transitions(ctx, &spx.object_ref(&()), &previous.conditions, &status.conditions).await;
    }
    // Changes to the SpiceProxy or anything it owns trigger a reconcile.
    Ok(Action::await_change())
}
