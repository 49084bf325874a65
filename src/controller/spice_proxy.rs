//! SpiceProxy reconciler: runs the built-in proxy as ConfigMap + key Secret + Deployment +
//! Service + PodDisruptionBudget + egress NetworkPolicy owned by the SpiceProxy, and publishes
//! the URL clients use once it is Ready.

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
use crate::crd::{AuthMode, DEAD_PEER_MAX_SECONDS, DEAD_PEER_MIN_SECONDS, IpFamilyPolicy, ServiceType, SpiceProxy, SpiceProxySpec, SpiceProxyStatus, TrafficPolicy};
use crate::labels;
use crate::listener::ANY;
use crate::managed_fields;
use crate::metrics::ControllerLabel;
use crate::proxy::config::{self as pc, AllowedTarget, ProxyConfig};
use crate::proxy::proxy_protocol::ProxyProtocolConfig;
use crate::resolve::{UrlError, validate_host};

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

/// Pods read per diagnosis: a proxy has at most 100 replicas plus one surge.
const PODS_READ: u32 = 128;

/// Reads the proxy's pods (list only: no watch, no cache) and says what holds them up.
async fn diagnose(client: &kube::Client, ns: &str, name: &str) -> PodDiagnosis {
    let selector = labels::proxy_selector_string(name);
    match Api::<Pod>::namespaced(client.clone(), ns).list(&ListParams::default().labels(&selector).limit(PODS_READ)).await {
        Ok(pods) => diagnose_pods(&pods.items),
        Err(kube::Error::Api(e)) => PodDiagnosis::Unreadable(format!("{} {}: {}", e.code, e.reason, e.message)),
        Err(e) => PodDiagnosis::Unreadable(e.to_string()),
    }
}

/// Why replicas are not ready, as the scheduler or the kubelet put it on their pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodDiagnosis {
    /// Nothing wrong with the pods (starting, or ready).
    NothingWrong,
    /// The first pod (by name) with a problem, and how many others have one.
    Problem { pod: String, reason: String, message: String, others: usize },
    /// The pods could not be listed, e.g. without the rule to list pods.
    Unreadable(String),
}

/// Longest scheduler or kubelet message repeated in a condition.
const POD_MESSAGE_MAX: usize = 400;

pub fn diagnose_pods(pods: &[Pod]) -> PodDiagnosis {
    let mut found: Vec<(String, String, String)> =
        pods.iter().filter_map(|p| pod_problem(p).map(|(reason, message)| (p.name_any(), reason, message))).collect();
    found.sort();
    let others = found.len().saturating_sub(1);
    match found.into_iter().next() {
        Some((pod, reason, message)) => PodDiagnosis::Problem { pod, reason, message, others },
        None => PodDiagnosis::NothingWrong,
    }
}

/// A pod's problem: unschedulable, or a container the kubelet cannot start (image pull,
/// crash loop, missing config). States every pod passes through while starting are none.
fn pod_problem(pod: &Pod) -> Option<(String, String)> {
    const STARTING: [&str; 2] = ["ContainerCreating", "PodInitializing"];
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    if let Some(c) = status.conditions.iter().flatten().find(|c| c.type_ == "PodScheduled" && c.status == "False") {
        return Some((condition_reason(c.reason.as_deref(), "Unschedulable"), clip(c.message.as_deref().unwrap_or("not scheduled"))));
    }
    let containers = status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten());
    containers.into_iter().find_map(|c| {
        let waiting = c.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.clone().filter(|r| !STARTING.contains(&r.as_str()))?;
        // The proxy writes the error that ended it as its termination message: quote its first line.
        let last_exit = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()).map(|t| {
            let said = t.message.as_deref().and_then(|m| m.lines().map(str::trim).find(|l| !l.is_empty()));
            format!(" (last exit code {}{})", t.exit_code, said.map(|m| format!(": {m}")).unwrap_or_default())
        });
        let last_exit = last_exit.unwrap_or_default();
        let message = format!("container {}: {}{last_exit}", c.name, waiting.message.as_deref().unwrap_or(&reason));
        Some((condition_reason(Some(&reason), "ContainerNotStarting"), clip(&message)))
    })
}

/// A reason as a condition's schema accepts it (a letter, then letters, digits and '_').
fn condition_reason(reason: Option<&str>, fallback: &str) -> String {
    match reason {
        Some(r) if r.starts_with(|c: char| c.is_ascii_alphabetic()) && r.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => r.to_string(),
        _ => fallback.to_string(),
    }
}

fn clip(message: &str) -> String {
    match message.char_indices().nth(POD_MESSAGE_MAX) {
        Some((at, _)) => format!("{}…", &message[..at]),
        None => message.to_string(),
    }
}

impl PodDiagnosis {
    /// What the conditions say about the pods, after "n/m replicas ready".
    fn detail(&self) -> String {
        match self {
            PodDiagnosis::NothingWrong => String::new(),
            PodDiagnosis::Problem { pod, reason, message, others } => {
                let more = match others {
                    0 => String::new(),
                    1 => " (1 more pod has a problem)".into(),
                    n => format!(" ({n} more pods have a problem)"),
                };
                format!("; pod {pod}: {reason}: {message}{more}")
            }
            PodDiagnosis::Unreadable(why) => format!(" (cannot list its pods to say why: {why})"),
        }
    }
}

/// Server-side applies every child (one field manager); returns what the API server stored.
///
/// All or nothing, as far as the API server decides: children that differ from the ones last
/// applied in full are first applied with `dryRun=All`, so a refusal (a node port taken, a
/// quota, an admission webhook, a missing permission) leaves every child as it was, rather than
/// rolling the Deployment to a configuration its Service never got. A refusal the rehearsal
/// could not foresee (a node port taken in between, an admission rule that lets dry runs pass)
/// puts the children last applied back, so the earlier ones do not keep the new version.
/// Re-applying the children last applied skips the rehearsal: a refusal part-way through cannot
/// mix two versions then. The record of the last full apply is this process's; without one
/// (`reconciled_before`, after a restart) it is read back from the children.
async fn apply(children: Children, owner: &OwnerReference, ns: &str, name: &str, reconciled_before: bool, ctx: &Context) -> Result<(Deployment, Service)> {
    let children = children.owned_by(owner);
    let (encoded, digest) = children.encode()?;
    let children = children.stamped(&digest);
    let mut previous = ctx.applied.lock().unwrap_or_else(|e| e.into_inner()).get(&owner.uid).cloned();
    // After a restart: what was applied in full is read back from the children themselves.
    if previous.is_none() && reconciled_before {
        previous = recall_applied(&ctx.client, ns, name, &owner.uid).await;
        if let Some(recalled) = &previous {
            remember_applied(ctx, &owner.uid, recalled.clone());
        }
    }
    let unchanged = previous.as_ref().is_some_and(|p| p.digest == digest);
    // Putting the children back changes the Deployment, which triggers a reconcile at once; that
    // one must not try the same change again, or the Deployment would flip between the two.
    if let Some(held) = previous.as_ref().and_then(|p| p.held.as_ref()).filter(|h| h.digest == digest) {
        let remaining = held.until.saturating_duration_since(Instant::now());
        if !remaining.is_zero() {
            return Err(Error::Held(remaining));
        }
    }
    let pp = PatchParams::apply(labels::FIELD_MANAGER).force();
    if !unchanged {
        apply_children(&children, owner, ns, name, &pp.clone().dry_run(), ctx).await?;
    }
    ensure_key_secret(&ctx.client, ns, name, owner).await?;
    match apply_children(&children, owner, ns, name, &pp, ctx).await {
        Ok(applied) => {
            remember_applied(ctx, &owner.uid, Applied { digest, encoded: encoded.into(), held: None });
            Ok(applied)
        }
        Err(Error::Kube(kube::Error::Api(mut refusal))) if !unchanged => {
            // No record means no set was ever applied in full (or it could not be read back
            // after a restart): the refusal is only reported, as the rehearsal passed.
            if let Some(previous) = previous {
                let put_back = async { apply_children(&previous.children()?, owner, ns, name, &pp, ctx).await }.await;
                refusal.message = rolled_back_message(&refusal.message, put_back.as_ref().err());
                if let Some(entry) = ctx.applied.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&owner.uid) {
                    entry.held = Some(Held { digest, until: Instant::now() + HOLD_AFTER_PUT_BACK });
                }
                match put_back {
                    Ok(_) => tracing::warn!(spiceproxy = name, namespace = ns, reason = %refusal.message, "change refused after its dry run passed; the children last applied were put back"),
                    Err(e) => tracing::error!(spiceproxy = name, namespace = ns, error = %e, "change refused after its dry run passed, and putting the children last applied back failed"),
                }
            }
            Err(Error::Kube(kube::Error::Api(refusal)))
        }
        Err(e) => Err(e),
    }
}

/// The refusal's message, saying whether the children were put back as they were.
fn rolled_back_message(refusal: &str, put_back_failed: Option<&Error>) -> String {
    match put_back_failed {
        None => format!("{refusal} (the objects already changed were put back as they were)"),
        Some(e) => format!("{refusal} (putting the objects already changed back failed too: {e}; retrying)"),
    }
}

/// The children of one SpiceProxy as last applied in full, and their digest.
#[derive(Clone)]
pub struct Applied {
    digest: String,
    /// The children unstamped, as `Children::encode` wrote them: JSON takes about a quarter of
    /// the memory of the typed objects, and is decoded only to put them back.
    encoded: Arc<[u8]>,
    /// A change refused after its rehearsal, and put back: not tried again until `until`.
    held: Option<Held>,
}

impl Applied {
    /// The digest of the set, as `Children::digest` computed it before applying.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The objects as applied, each stamped with the digest.
    pub fn children(&self) -> Result<Children> {
        Ok(serde_json::from_slice::<Children>(&self.encoded)?.stamped(&self.digest))
    }
}

/// `read_applied`, for a reconcile: a failed read only means that a change refused part-way
/// could not be put back, so it is logged and the change goes ahead, rehearsed.
async fn recall_applied(client: &kube::Client, ns: &str, name: &str, owner_uid: &str) -> Option<Applied> {
    read_applied(client, ns, name, owner_uid).await.unwrap_or_else(|e| {
        tracing::warn!(spiceproxy = name, namespace = ns, error = %e, "could not read back the children last applied; a change refused part-way cannot be put back");
        None
    })
}

/// The children last applied in full, read back from the cluster (five reads at once): what
/// this operator applied to each (its managedFields entry), if every child is owned by the
/// SpiceProxy and carries the same set digest. None if any is missing or differs, as after an
/// apply stopped part-way, or by an operator that did not stamp them yet.
pub async fn read_applied(client: &kube::Client, ns: &str, name: &str, owner_uid: &str) -> Result<Option<Applied>> {
    let (config_map_name, policy_name) = (config_map_name(name), network_policy_name(name));
    let (config_maps, deployments, services, budgets, policies) = (
        Api::<ConfigMap>::namespaced(client.clone(), ns),
        Api::<Deployment>::namespaced(client.clone(), ns),
        Api::<Service>::namespaced(client.clone(), ns),
        Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
        Api::<NetworkPolicy>::namespaced(client.clone(), ns),
    );
    let (config_map, deployment, service, disruption_budget, network_policy) = tokio::try_join!(
        config_maps.get_opt(&config_map_name),
        deployments.get_opt(name),
        services.get_opt(name),
        budgets.get_opt(name),
        policies.get_opt(&policy_name),
    )?;
    let (Some(config_map), Some(deployment), Some(service), Some(disruption_budget)) = (config_map, deployment, service, disruption_budget) else {
        return Ok(None);
    };
    // Someone else's NetworkPolicy of that name is not one of ours (and never touched).
    let network_policy = network_policy.filter(|p| p.owner_references().iter().any(|o| o.uid == owner_uid));
    Ok(applied_in_full(Children { config_map, deployment, service, disruption_budget, network_policy }, owner_uid))
}

/// `read_applied`'s judgement of the live children (pure).
fn applied_in_full(mut live: Children, owner_uid: &str) -> Option<Applied> {
    let stamp = |meta: &ObjectMeta| meta.annotations.as_ref()?.get(labels::APPLIED_SET).cloned();
    let digest = stamp(&live.config_map.metadata)?;
    let one_set = live.metas_mut().all(|meta| stamp(meta).as_ref() == Some(&digest) && meta.owner_references.iter().flatten().any(|o| o.uid == owner_uid));
    if !one_set {
        return None;
    }
    let children = Children {
        config_map: managed_fields::applied_by(&live.config_map, labels::FIELD_MANAGER)?,
        deployment: managed_fields::applied_by(&live.deployment, labels::FIELD_MANAGER)?,
        service: managed_fields::applied_by(&live.service, labels::FIELD_MANAGER)?,
        disruption_budget: managed_fields::applied_by(&live.disruption_budget, labels::FIELD_MANAGER)?,
        network_policy: match &live.network_policy {
            Some(policy) => Some(managed_fields::applied_by(policy, labels::FIELD_MANAGER)?),
            None => None,
        },
    };
    let (encoded, _) = children.unstamped().encode().ok()?;
    Some(Applied { digest, encoded: encoded.into(), held: None })
}

#[derive(Clone)]
struct Held {
    digest: String,
    until: Instant,
}

/// How long a change put back is not tried again: the first retry's delay, so retries follow
/// the backoff rather than the watch events the put-back itself causes.
const HOLD_AFTER_PUT_BACK: std::time::Duration = super::RETRY_FIRST;

/// One pass over the children, for real or (with `pp.dry_run`) as a rehearsal.
async fn apply_children(children: &Children, owner: &OwnerReference, ns: &str, name: &str, pp: &PatchParams, ctx: &Context) -> Result<(Deployment, Service)> {
    let client = &ctx.client;
    let Children { config_map, deployment, service, disruption_budget, network_policy } = children;
    Api::<ConfigMap>::namespaced(client.clone(), ns).patch(&config_map.name_any(), pp, &Patch::Apply(config_map)).await?;
    let deployment = Api::<Deployment>::namespaced(client.clone(), ns).patch(&deployment.name_any(), pp, &Patch::Apply(deployment)).await?;
    let service = Api::<Service>::namespaced(client.clone(), ns).patch(&service.name_any(), pp, &Patch::Apply(service)).await?;
    Api::<PodDisruptionBudget>::namespaced(client.clone(), ns).patch(&disruption_budget.name_any(), pp, &Patch::Apply(disruption_budget)).await?;
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), ns);
    match network_policy {
        Some(policy) => {
            policies.patch(&policy.name_any(), pp, &Patch::Apply(policy)).await?;
        }
        // Turned off: delete the one made before, and only if it is ours.
        None => {
            let ours = policies.get_opt(&network_policy_name(name)).await?.filter(|p| p.owner_references().iter().any(|o| o.uid == owner.uid));
            if let Some(policy) = ours {
                let dp = DeleteParams { dry_run: pp.dry_run, ..Default::default() };
                policies.delete(&policy.name_any(), &dp).await?;
            }
        }
    }
    Ok((deployment, service))
}

/// Records a full apply. Entries of deleted SpiceProxies are dropped once they could outnumber
/// the live ones, so the table stays the size of the cache.
fn remember_applied(ctx: &Context, uid: &str, applied: Applied) {
    remember(&mut ctx.applied.lock().unwrap_or_else(|e| e.into_inner()), &ctx.proxies, uid, applied);
}

fn remember<V>(applied: &mut HashMap<String, V>, live: &reflector::Store<DeserializeGuard<SpiceProxy>>, uid: &str, value: V) {
    applied.insert(uid.to_string(), value);
    if applied.len() > 2 * live.len() + 16 {
        let live = live.state();
        let uids: HashSet<&str> = live.iter().filter_map(|p| p.meta().uid.as_deref()).collect();
        // The one just applied stays even if the cache has not caught up with it yet.
        applied.retain(|kept, _| kept == uid || uids.contains(kept.as_str()));
    }
}

/// Status after the API server refused an apply: `QuotaExceeded` for a namespace's
/// ResourceQuota, `Forbidden` for a missing permission, `ApplyFailed` for anything else, with
/// the server's own message.
pub fn apply_failed_status(spx: &SpiceProxy, e: &kube::core::Status) -> SpiceProxyStatus {
    let generation = spx.metadata.generation;
    let previous = spx.status.clone().unwrap_or_default();
    // A quota answers 403 too, but no RBAC rule would help: the namespace's owner must act.
    let reason = match e.code {
        403 if e.message.contains("exceeded quota") => "QuotaExceeded",
        403 => "Forbidden",
        _ => "ApplyFailed",
    };
    let msg = format!("the API server refused a change ({} {}): {}", e.code, e.reason, e.message);
    SpiceProxyStatus {
        conditions: vec![
            conditions::new("Ready", false, reason, &msg, generation),
            conditions::new("Progressing", false, reason, "retrying with backoff", generation),
            conditions::new("Degraded", true, reason, &msg, generation),
        ],
        observed_generation: generation,
        ..previous
    }
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

/// A DNS-1123 subdomain, what Kubernetes accepts as the name of a Secret.
fn is_object_name(name: &str) -> bool {
    let edge_ok = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    name.len() <= 253
        && edge_ok(name.bytes().next())
        && edge_ok(name.bytes().last())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The user's spread constraints, each counting this proxy's pods unless it names others; by
/// default one replica per node where possible, so a node's loss leaves consoles served.
fn spread_constraints(spec: &SpiceProxySpec, selector: &BTreeMap<String, String>) -> Vec<TopologySpreadConstraint> {
    let own_pods = || LabelSelector { match_labels: Some(selector.clone()), ..Default::default() };
    match &spec.topology_spread_constraints {
        Some(constraints) => constraints.iter().cloned().map(|c| TopologySpreadConstraint { label_selector: c.label_selector.clone().or_else(|| Some(own_pods())), ..c }).collect(),
        None => vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(own_pods()),
            ..Default::default()
        }],
    }
}

/// Checks what the CRD schema cannot (or what a CRD installed without CEL would let through).
pub fn validate(spec: &SpiceProxySpec) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    if spec.allowed_targets.is_empty() {
        problems.push("allowedTargets is empty: the proxy is never an open proxy, list the hypervisor CIDRs and ports".into());
    }
    for (i, rule) in spec.allowed_targets.iter().enumerate() {
        if rule.cidr.parse::<ipnet::IpNet>().is_err() {
            problems.push(format!("allowedTargets[{i}].cidr {:?} is not a CIDR such as 10.0.0.0/16", rule.cidr));
        }
        if rule.ports.is_empty() {
            problems.push(format!("allowedTargets[{i}].ports is empty"));
        }
        for (j, p) in rule.ports.iter().enumerate() {
            let to = p.to.unwrap_or(p.from);
            if !(1..=65535).contains(&p.from) || !(1..=65535).contains(&to) || to < p.from {
                problems.push(format!("allowedTargets[{i}].ports[{j}] {}-{to} is not a port range within 1-65535", p.from));
            }
        }
    }
    if spec.auth.mode == AuthMode::Basic && spec.auth.credentials_secret.is_none() {
        problems.push("auth mode Basic needs credentialsSecret".into());
    }
    if spec.limits.idle_timeout_seconds <= 300 {
        problems.push("limits.idleTimeoutSeconds must exceed 300: SPICE servers ping idle channels only every 300 s".into());
    }
    if !(DEAD_PEER_MIN_SECONDS..=DEAD_PEER_MAX_SECONDS).contains(&spec.limits.dead_peer_timeout_seconds) {
        problems.push(format!("limits.deadPeerTimeoutSeconds {} is outside {DEAD_PEER_MIN_SECONDS}-{DEAD_PEER_MAX_SECONDS}", spec.limits.dead_peer_timeout_seconds));
    }
    if spec.limits.half_closed_timeout_seconds < 1 {
        problems.push(format!("limits.halfClosedTimeoutSeconds {} must be at least 1", spec.limits.half_closed_timeout_seconds));
    }
    if spec.limits.max_auth_failures_per_client < 0 {
        problems.push(format!("limits.maxAuthFailuresPerClient {} must be 0 (off) or more", spec.limits.max_auth_failures_per_client));
    }
    if !(1..=86_400).contains(&spec.limits.auth_failure_window_seconds) {
        problems.push(format!("limits.authFailureWindowSeconds {} is outside 1-86400", spec.limits.auth_failure_window_seconds));
    }
    if let Some(h) = &spec.html5 {
        if spec.auth.mode != AuthMode::Ticket {
            problems.push("html5 needs auth mode Ticket: the token in the browser console URL names the VM".into());
        }
        if h.port == spec.service.port {
            problems.push(format!("html5.port {} is also the proxy's service port", h.port));
        }
        for o in &h.allowed_origins {
            let ok = (o.starts_with("http://") || o.starts_with("https://")) && !o.trim_end_matches('/').split_once("://").is_some_and(|(_, rest)| rest.is_empty() || rest.contains('/'));
            if !ok {
                problems.push(format!("html5.allowedOrigins entry {o:?} is not an origin such as https://portal.example.com"));
            }
        }
    }
    if let Some(p) = &spec.service.proxy_protocol {
        if p.trusted_cidrs.is_empty() {
            problems.push("service.proxyProtocol.trustedCidrs is empty: name the load balancers that send the PROXY protocol".into());
        }
        for (i, c) in p.trusted_cidrs.iter().enumerate() {
            if c.parse::<ipnet::IpNet>().is_err() {
                problems.push(format!("service.proxyProtocol.trustedCidrs[{i}] {c:?} is not a CIDR such as 10.0.0.0/16"));
            }
        }
    }
    match (spec.service.type_, spec.service.external_traffic_policy) {
        (ServiceType::ClusterIP, Some(_)) => problems.push("service.externalTrafficPolicy needs service type NodePort or LoadBalancer".into()),
        (ServiceType::NodePort, Some(TrafficPolicy::Local)) if spec.external_address.is_none() => {
            problems.push("service.externalTrafficPolicy Local with type NodePort needs externalAddress: only nodes running a proxy replica answer".into())
        }
        _ => {}
    }
    if let Some(ext) = &spec.external_address
        && let Err(e) = validate_host(&ext.host)
    {
        problems.push(format!("externalAddress.host: {e}"));
    }
    let own_labels = labels::proxy_labels("");
    for key in spec.pod_labels.iter().flatten().map(|(k, _)| k).filter(|k| own_labels.contains_key(*k)) {
        problems.push(format!("podLabels: {key} is set by the operator on every proxy pod"));
    }
    if spec.pod_annotations.as_ref().is_some_and(|a| a.contains_key(labels::CONFIG_HASH)) {
        problems.push(format!("podAnnotations: {} is set by the operator (it rolls the pods when the configuration changes)", labels::CONFIG_HASH));
    }
    for (i, secret) in spec.image_pull_secrets.iter().flatten().enumerate() {
        if !is_object_name(&secret.name) {
            problems.push(format!("imagePullSecrets[{i}].name {:?} is not a Secret name (lower-case letters, digits, '-' and '.')", secret.name));
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(problems) }
}

/// Objects that make up one proxy, without owner references (added at apply time).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Children {
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    /// Lets node drains evict one replica at a time, never all at once.
    pub disruption_budget: PodDisruptionBudget,
    /// Egress only to the allowed targets and DNS; None when the SpiceProxy turns it off.
    pub network_policy: Option<NetworkPolicy>,
}

impl Children {
    /// The same objects, each owned by the SpiceProxy, so they go with it.
    fn owned_by(mut self, owner: &OwnerReference) -> Self {
        for meta in self.metas_mut() {
            meta.owner_references = Some(vec![owner.clone()]);
        }
        self
    }

    /// Every object's metadata, the NetworkPolicy's if there is one.
    fn metas_mut(&mut self) -> impl Iterator<Item = &mut ObjectMeta> {
        let metas = [&mut self.config_map.metadata, &mut self.deployment.metadata, &mut self.service.metadata, &mut self.disruption_budget.metadata];
        metas.into_iter().chain(self.network_policy.as_mut().map(|p| &mut p.metadata))
    }

    /// The same objects, each marked with the digest of the set (`labels::APPLIED_SET`): after a
    /// restart, a set that carries one digest throughout was applied in full.
    fn stamped(mut self, digest: &str) -> Self {
        for meta in self.metas_mut() {
            meta.annotations.get_or_insert_default().insert(labels::APPLIED_SET.into(), digest.into());
        }
        self
    }

    /// The same objects without the stamp (an annotations map left empty goes too).
    pub fn unstamped(mut self) -> Self {
        for meta in self.metas_mut() {
            if let Some(annotations) = &mut meta.annotations {
                annotations.remove(labels::APPLIED_SET);
                if annotations.is_empty() {
                    meta.annotations = None;
                }
            }
        }
        self
    }

    /// The objects as JSON, and its digest (in hex), which identifies them as they would be
    /// applied: equal digests, equal applies.
    pub fn encode(&self) -> Result<(Vec<u8>, String)> {
        let encoded = serde_json::to_vec(self)?;
        let digest = format!("{:x}", Sha256::digest(&encoded));
        Ok((encoded, digest))
    }

    /// `encode`'s digest alone.
    pub fn digest(&self) -> Result<String> {
        Ok(self.encode()?.1)
    }
}

pub fn network_policy_name(spx: &str) -> String {
    format!("{spx}-egress")
}

pub fn config_map_name(spx: &str) -> String {
    format!("{spx}-config")
}
pub fn key_secret_name(spx: &str) -> String {
    format!("{spx}-keys")
}

/// The proxy configuration a replica reads; assumes `validate` passed.
pub fn proxy_config(spec: &SpiceProxySpec) -> ProxyConfig {
    ProxyConfig {
        listen: format!("{}:{}", ANY, pc::LISTEN_PORT),
        admin_listen: format!("{}:{}", ANY, pc::ADMIN_PORT),
        allowed_targets: spec
            .allowed_targets
            .iter()
            .filter_map(|r| {
                let cidr = r.cidr.parse().ok()?;
                let ports = r.ports.iter().map(|p| (p.from as u16, p.to.unwrap_or(p.from) as u16)).collect();
                Some(AllowedTarget { cidr, ports })
            })
            .collect(),
        auth_mode: spec.auth.mode,
        keys_dir: Some(pc::KEYS_DIR.into()),
        basic_dir: spec.auth.credentials_secret.as_ref().map(|_| pc::BASIC_DIR.into()),
        limits: spec.limits.clone(),
        data_path: Default::default(),
        html5: spec.html5.as_ref().map(|h| pc::Html5Config {
            listen: format!("{}:{}", ANY, pc::HTML5_PORT),
            static_dir: pc::HTML5_DIR.into(),
            allowed_origins: h.allowed_origins.clone(),
            tls: h.tls_secret.as_ref().map(|_| pc::TlsFiles {
                cert_file: format!("{}/tls.crt", pc::HTML5_TLS_DIR),
                key_file: format!("{}/tls.key", pc::HTML5_TLS_DIR),
            }),
            upstream_tls: h.upstream_tls.as_ref().map(|u| pc::UpstreamTls {
                ca_file: format!("{}/ca.crt", pc::UPSTREAM_CA_DIR),
                host_subject: u.host_subject.clone(),
            }),
        }),
        // One per CPU the pod may use (its CPU limit counts).
        workers: None,
        proxy_protocol: spec.service.proxy_protocol.as_ref().map(|p| ProxyProtocolConfig {
            trusted: p.trusted_cidrs.iter().filter_map(|c| c.parse().ok()).collect(),
        }),
    }
}

pub fn build(spx: &SpiceProxy, image: &str) -> Result<Children> {
    let name = spx.name_any();
    let ns = spx.namespace();
    let spec = &spx.spec;
    let labels = labels::proxy_labels(&name);
    let meta = |n: String| ObjectMeta { name: Some(n), namespace: ns.clone(), labels: Some(labels.clone()), ..Default::default() };

    let config_json = serde_json::to_string_pretty(&proxy_config(spec))?;
    let config_hash = format!("{:x}", Sha256::digest(config_json.as_bytes()));
    let config_map = ConfigMap {
        metadata: meta(config_map_name(&name)),
        data: Some(BTreeMap::from([(pc::CONFIG_FILE.to_string(), config_json)])),
        ..Default::default()
    };

    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource { name: config_map_name(&name), ..Default::default() }),
            ..Default::default()
        },
        Volume {
            name: "keys".into(),
            secret: Some(SecretVolumeSource { secret_name: Some(key_secret_name(&name)), ..Default::default() }),
            ..Default::default()
        },
    ];
    let mut mounts = vec![
        VolumeMount { name: "config".into(), mount_path: pc::CONFIG_DIR.into(), read_only: Some(true), ..Default::default() },
        VolumeMount { name: "keys".into(), mount_path: pc::KEYS_DIR.into(), read_only: Some(true), ..Default::default() },
    ];
    if let Some(secret) = &spec.auth.credentials_secret {
        volumes.push(Volume {
            name: "basic".into(),
            secret: Some(SecretVolumeSource { secret_name: Some(secret.clone()), ..Default::default() }),
            ..Default::default()
        });
        mounts.push(VolumeMount { name: "basic".into(), mount_path: pc::BASIC_DIR.into(), read_only: Some(true), ..Default::default() });
    }
    if let Some(secret) = spec.html5.as_ref().and_then(|h| h.tls_secret.as_ref()) {
        volumes.push(Volume {
            name: "html5-tls".into(),
            secret: Some(SecretVolumeSource { secret_name: Some(secret.clone()), ..Default::default() }),
            ..Default::default()
        });
        mounts.push(VolumeMount { name: "html5-tls".into(), mount_path: pc::HTML5_TLS_DIR.into(), read_only: Some(true), ..Default::default() });
    }
    if let Some(u) = spec.html5.as_ref().and_then(|h| h.upstream_tls.as_ref()) {
        volumes.push(Volume {
            name: "hypervisor-ca".into(),
            secret: Some(SecretVolumeSource { secret_name: Some(u.ca_secret.clone()), ..Default::default() }),
            ..Default::default()
        });
        mounts.push(VolumeMount { name: "hypervisor-ca".into(), mount_path: pc::UPSTREAM_CA_DIR.into(), read_only: Some(true), ..Default::default() });
    }
    let probe = |path: &str, period| Probe {
        http_get: Some(HTTPGetAction { path: Some(path.into()), port: IntOrString::String("admin".into()), ..Default::default() }),
        period_seconds: Some(period),
        ..Default::default()
    };
    let quantity = |s: &str| Quantity(s.into());
    let resources = spec.resources.clone().unwrap_or_else(|| ResourceRequirements {
        requests: Some(BTreeMap::from([("cpu".into(), quantity("50m")), ("memory".into(), quantity("32Mi"))])),
        // Splice moves bytes in the kernel; 2 CPUs carry well over 10 Gbit/s (make bench-proxy).
        limits: Some(BTreeMap::from([("cpu".into(), quantity("2")), ("memory".into(), quantity("256Mi"))])),
        ..Default::default()
    });
    let container = Container {
        name: "proxy".into(),
        image: Some(image.into()),
        // JSON like the audit lines on stdout, so the pod's whole log is one format for collectors.
        args: Some(vec!["proxy".into(), "--config".into(), format!("{}/{}", pc::CONFIG_DIR, pc::CONFIG_FILE), "--log-json".into()]),
        ports: Some(
            [
                Some(ContainerPort { name: Some("proxy".into()), container_port: pc::LISTEN_PORT.into(), ..Default::default() }),
                Some(ContainerPort { name: Some("admin".into()), container_port: pc::ADMIN_PORT.into(), ..Default::default() }),
                spec.html5.as_ref().map(|_| ContainerPort { name: Some("html5".into()), container_port: pc::HTML5_PORT.into(), ..Default::default() }),
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
        readiness_probe: Some(probe("/readyz", 5)),
        liveness_probe: Some(probe("/healthz", 10)),
        resources: Some(resources),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let selector = labels::proxy_selector(&name);
    let deployment = Deployment {
        metadata: meta(name.clone()),
        spec: DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector { match_labels: Some(selector.clone()), ..Default::default() },
            // Never drop below the desired count while rolling: open consoles stay served.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    // The user's extras first, so the operator's own keys win (validate refuses clashes).
                    labels: Some(spec.pod_labels.clone().unwrap_or_default().into_iter().chain(labels.clone()).collect()),
                    annotations: Some(
                        spec.pod_annotations.clone().unwrap_or_default().into_iter().chain([(labels::CONFIG_HASH.to_string(), config_hash)]).collect(),
                    ),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    // Covers the proxy's drain deadline so open tunnels can finish.
                    termination_grace_period_seconds: Some(i64::from(spec.limits.drain_seconds) + 10),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
                        ..Default::default()
                    }),
                    image_pull_secrets: spec.image_pull_secrets.clone(),
                    priority_class_name: spec.priority_class_name.clone(),
                    node_selector: spec.node_selector.clone(),
                    tolerations: spec.tolerations.clone(),
                    affinity: spec.affinity.clone(),
                    topology_spread_constraints: Some(spread_constraints(spec, &selector)),
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    };
    let service = Service {
        metadata: ObjectMeta { annotations: spec.service.annotations.clone(), ..meta(name.clone()) },
        spec: Some(K8sServiceSpec {
            type_: Some(service_value(spec.service.type_)),
            external_traffic_policy: spec.service.effective_traffic_policy().map(service_value),
            // Absent means SingleStack, which is what Kubernetes gives a new Service, applied
            // explicitly: a Service made dual-stack keeps both families when the field is only
            // dropped (the API server infers RequireDualStack from them).
            ip_family_policy: Some(service_value(spec.service.ip_family_policy.unwrap_or(IpFamilyPolicy::SingleStack))),
            selector: Some(selector),
            ports: Some(
                [
                    Some(ServicePort {
                        name: Some("proxy".into()),
                        port: spec.service.port,
                        target_port: Some(IntOrString::String("proxy".into())),
                        node_port: spec.service.node_port,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    }),
                    spec.html5.as_ref().map(|h| ServicePort {
                        name: Some("html5".into()),
                        port: h.port,
                        target_port: Some(IntOrString::String("html5".into())),
                        node_port: h.node_port,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    }),
                ]
                .into_iter()
                .flatten()
                .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    let disruption_budget = PodDisruptionBudget {
        metadata: meta(name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(labels::proxy_selector(&name)), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let network_policy = spec.network_policy.enabled.then(|| NetworkPolicy {
        metadata: meta(network_policy_name(&name)),
        spec: Some(K8sNetworkPolicySpec {
            pod_selector: Some(LabelSelector { match_labels: Some(labels::proxy_selector(&name)), ..Default::default() }),
            policy_types: Some(vec!["Egress".into()]),
            egress: Some(egress_rules(spec)),
            ..Default::default()
        }),
    });
    Ok(Children { config_map, deployment, service, disruption_budget, network_policy })
}

/// TCP to each allowed block on its ports, and DNS anywhere: a target may be a name the proxy
/// resolves, and where the cluster's DNS answers from differs between clusters.
fn egress_rules(spec: &SpiceProxySpec) -> Vec<NetworkPolicyEgressRule> {
    let port = |protocol: &str, from: i32, to: Option<i32>| NetworkPolicyPort {
        protocol: Some(protocol.into()),
        port: Some(IntOrString::Int(from)),
        end_port: to.filter(|&to| to > from),
    };
    let targets = spec.allowed_targets.iter().map(|rule| NetworkPolicyEgressRule {
        to: Some(vec![NetworkPolicyPeer {
            // The API server wants the network address (no host bits); validate checked it parses.
            ip_block: Some(IPBlock { cidr: rule.cidr.parse::<ipnet::IpNet>().map_or_else(|_| rule.cidr.clone(), |n| n.trunc().to_string()), except: None }),
            ..Default::default()
        }]),
        ports: Some(rule.ports.iter().map(|p| port("TCP", p.from, p.to)).collect()),
    });
    let dns = NetworkPolicyEgressRule { to: None, ports: Some(vec![port("UDP", 53, None), port("TCP", 53, None)]) };
    targets.chain([dns]).collect()
}

/// A Service field's value from our enum that mirrors it (type, traffic policy, IP families):
/// the variant's serde name, which is the Kubernetes spelling and what the CRD schema lists.
fn service_value(v: impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(name)) => name,
        other => unreachable!("a unit enum serialises to its name, not {other:?}"),
    }
}

/// The ticket signing key. Created once with a random key and never overwritten, so every
/// replica (and every restart of the operator) keeps validating the tickets already issued.
async fn ensure_key_secret(client: &kube::Client, ns: &str, spx: &str, owner: &OwnerReference) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let name = key_secret_name(spx);
    if api.get_metadata_opt(&name).await?.is_some() {
        return Ok(());
    }
    let key: [u8; 32] = rand::random();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(ns.into()),
            labels: Some(labels::proxy_labels(spx)),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(crate::proxy::ticket::CURRENT_KEY.into(), k8s_openapi::ByteString(key.to_vec()))])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The node address a NodePort URL names, when it names one (no externalAddress).
async fn node_address(spx: &SpiceProxy, client: &kube::Client) -> Result<Option<String>> {
    if spx.spec.service.type_ == ServiceType::NodePort && spx.spec.external_address.is_none() { first_node_address(client).await } else { Ok(None) }
}

/// The Deployment and Service applied before for the SpiceProxy `owner_uid`, if both exist.
async fn live_children(client: &kube::Client, ns: &str, name: &str, owner_uid: Option<&str>) -> Result<Option<(Deployment, Service)>> {
    let (deployments, services) = (Api::<Deployment>::namespaced(client.clone(), ns), Api::<Service>::namespaced(client.clone(), ns));
    let (deploy, svc) = tokio::try_join!(deployments.get_opt(name), services.get_opt(name))?;
    let owned = |meta: &ObjectMeta| meta.owner_references.iter().flatten().any(|o| Some(o.uid.as_str()) == owner_uid);
    Ok(deploy.filter(|d| owned(&d.metadata)).zip(svc.filter(|s| owned(&s.metadata))))
}

/// Address of a schedulable node for a NodePort URL: ExternalIP first, then InternalIP.
async fn first_node_address(client: &kube::Client) -> Result<Option<String>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes.list(&ListParams::default().limit(50)).await?;
    let pick = |kind: &str| {
        list.items.iter().find_map(|n| {
            n.status.as_ref()?.addresses.as_ref()?.iter().find(|a| a.type_ == kind && !a.address.contains(':')).map(|a| a.address.clone())
        })
    };
    Ok(pick("ExternalIP").or_else(|| pick("InternalIP")))
}

/// Where clients reach the proxy, or why it is not known (yet).
pub fn derive_url(spx: &SpiceProxy, svc: &Service, node_address: Option<&str>) -> Result<String, (bool, String)> {
    let spec = &spx.spec;
    let node_port = svc.spec.as_ref().and_then(|s| s.ports.as_ref()).and_then(|p| p.first()).and_then(|p| p.node_port);
    let (host, port) = if let Some(ext) = &spec.external_address {
        let port = ext.port.or(if spec.service.type_ == ServiceType::NodePort { node_port } else { None }).unwrap_or(spec.service.port);
        (ext.host.clone(), port)
    } else {
        match spec.service.type_ {
            ServiceType::LoadBalancer => {
                let ingresses = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_deref()).unwrap_or_default();
                let addresses: Vec<String> = ingresses.iter().filter_map(|i| i.hostname.clone().or_else(|| i.ip.clone())).collect();
                // A dual-stack load balancer may list its IPv6 address first: take the first a
                // SPICE client can use, else the first (reported below as unusable).
                match addresses.iter().find(|a| validate_host(a).is_ok()).or(addresses.first()).cloned() {
                    Some(h) => (h, spec.service.port),
                    None => return Err((false, "waiting for the LoadBalancer to publish an ingress address".into())),
                }
            }
            ServiceType::NodePort => match (node_address, node_port) {
                (Some(a), Some(p)) => (a.to_string(), p),
                (None, _) => return Err((false, "no node address found for the NodePort; set externalAddress.host".into())),
                (_, None) => return Err((false, "waiting for a node port to be allocated".into())),
            },
            ServiceType::ClusterIP => (format!("{}.{}.svc", spx.name_any(), spx.namespace().unwrap_or_default()), spec.service.port),
        }
    };
    // An IPv6 LoadBalancer address, say, would make SPICE clients connect directly: report, never publish.
    match validate_host(&host) {
        Ok(h) => Ok(format!("http://{h}:{port}")),
        Err(e @ (UrlError::Ipv6 | UrlError::BadHost(_))) => Err((true, format!("address {host:?} cannot be handed to SPICE clients: {e}"))),
        Err(e) => Err((true, e.to_string())),
    }
}

/// The browser console base URL, on the same host as the proxy URL.
pub fn derive_html5_url(spx: &SpiceProxy, svc: &Service, proxy_url: &str) -> Option<String> {
    let h = spx.spec.html5.as_ref()?;
    let host = proxy_url.strip_prefix("http://")?.rsplit_once(':')?.0;
    let node_port = || {
        svc.spec.as_ref()?.ports.as_ref()?.iter().find(|p| p.name.as_deref() == Some("html5"))?.node_port
    };
    let port = h.external_port.or_else(|| if spx.spec.service.type_ == ServiceType::NodePort { node_port() } else { None }).unwrap_or(h.port);
    let scheme = if h.tls_secret.is_some() { "https" } else { "http" };
    Some(format!("{scheme}://{host}:{port}/spice_auto.html"))
}

/// Every replica runs the current pod template and is ready, and no old one is left.
pub fn rolled_out(spx: &SpiceProxy, deploy: &Deployment) -> bool {
    let desired = spx.spec.replicas;
    let ds = deploy.status.clone().unwrap_or_default();
    ds.observed_generation >= deploy.metadata.generation
        && ds.updated_replicas.unwrap_or(0) >= desired
        && ds.replicas.unwrap_or(0) <= desired
        && ds.ready_replicas.unwrap_or(0) >= desired
}

pub fn build_status(spx: &SpiceProxy, deploy: &Deployment, svc: &Service, node_address: Option<&str>, pods: &PodDiagnosis) -> SpiceProxyStatus {
    let generation = spx.metadata.generation;
    let desired = spx.spec.replicas;
    let ds = deploy.status.clone().unwrap_or_default();
    let ready = ds.ready_replicas.unwrap_or(0);
    let updated = ds.updated_replicas.unwrap_or(0);
    let rolled_out = rolled_out(spx, deploy);
    let url = derive_url(spx, svc, node_address);
    let replica_failure = ds.conditions.iter().flatten().find(|c| c.type_.as_deref() == Some("ReplicaFailure") && c.status.as_deref() == Some("True"));
    // The Deployment gave up waiting (progressDeadlineSeconds, 600 s) for pods whose problem
    // the pods do not name, such as a readiness probe that never passes.
    let stalled = ds.conditions.iter().flatten().find(|c| c.type_.as_deref() == Some("Progressing") && c.reason.as_deref() == Some("ProgressDeadlineExceeded"));

    // Ready means "serving at its URL": policies publish the URL of a Ready proxy only, so a
    // rollout, a scale-up or one lost replica must not take it from engines while other
    // replicas serve. Progressing and Degraded tell the rest.
    let (ready_ok, ready_reason, ready_msg) = match &url {
        Err((true, why)) => (false, "UnusableAddress", why.clone()),
        _ if desired == 0 => (false, "ScaledToZero", "replicas is 0".to_string()),
        _ if ready == 0 => (false, "ReplicasNotReady", format!("{ready}/{desired} replicas ready{}", pods.detail())),
        Err((false, why)) => (false, "AddressPending", why.clone()),
        Ok(u) => (true, "ProxyReady", format!("{ready}/{desired} replicas ready at {u}{}", pods.detail())),
    };
    let (degraded, degraded_reason, degraded_msg) = match (&url, replica_failure, pods) {
        (Err((true, why)), _, _) => (true, "UnusableAddress", why.clone()),
        (_, Some(c), _) => (true, "ReplicaFailure", c.message.clone().unwrap_or_default()),
        // The scheduler's or kubelet's own reason (Unschedulable, ImagePullBackOff, CrashLoopBackOff...).
        (_, None, PodDiagnosis::Problem { reason, .. }) => (true, reason.as_str(), pods.detail().trim_start_matches("; ").to_string()),
        _ if stalled.is_some() && !rolled_out => {
            (true, "ProgressDeadlineExceeded", format!("{ready}/{desired} replicas ready: {}", stalled.and_then(|c| c.message.clone()).unwrap_or_default()))
        }
        _ => (false, "AsExpected", "no problems found".to_string()),
    };
    let (progressing, prog_reason, prog_msg) = match (&url, rolled_out) {
        (_, false) => (true, "RollingOut", format!("{updated} updated, {ready} ready of {desired} replicas")),
        (Err((false, why)), true) => (true, "AddressPending", why.clone()),
        _ => (false, "Complete", "rollout complete".to_string()),
    };
    let html5_url = url.as_ref().ok().and_then(|u| derive_html5_url(spx, svc, u));
    let mut conditions = vec![
        conditions::new("Ready", ready_ok, ready_reason, ready_msg, generation),
        conditions::new("Progressing", progressing, prog_reason, prog_msg, generation),
        conditions::new("Degraded", degraded, degraded_reason, degraded_msg, generation),
    ];
    if let Some(h) = &spx.spec.html5 {
        conditions.push(match &h.tls_secret {
            Some(secret) => conditions::new("Html5Encrypted", true, "TLS", format!("browser consoles use https:// and wss:// with the certificate in Secret {secret}"), generation),
            None => conditions::new(
                "Html5Encrypted",
                false,
                "PlainWebSocket",
                "browser consoles use ws://: console tokens travel in clear; set html5.tlsSecret or put a TLS-terminating ingress in front of the html5 port",
                generation,
            ),
        });
    }
    SpiceProxyStatus {
        proxy_url: url.ok(),
        html5_url,
        ready_replicas: ready,
        replicas: ds.replicas.unwrap_or(0),
        selector: Some(labels::proxy_selector_string(&spx.name_any())),
        observed_generation: generation,
        conditions,
    }
}

fn invalid_status(spx: &SpiceProxy, why: &str) -> SpiceProxyStatus {
    not_applied_status(spx, "InvalidSpec", why, "nothing applied until the spec is fixed")
}

/// How often a SpiceProxy whose Secret is missing looks for it again.
const SECRET_RECHECK: Duration = Duration::from_secs(10);

/// The Secrets the proxy pods mount, each with the spec field that names it.
pub fn mounted_secrets(spec: &SpiceProxySpec) -> Vec<(&'static str, &str)> {
    let html5 = spec.html5.as_ref();
    [
        ("auth.credentialsSecret", spec.auth.credentials_secret.as_deref()),
        ("html5.tlsSecret", html5.and_then(|h| h.tls_secret.as_deref())),
        ("html5.upstreamTls.caSecret", html5.and_then(|h| h.upstream_tls.as_ref()).map(|u| u.ca_secret.as_str())),
    ]
    .into_iter()
    .filter_map(|(field, secret)| Some((field, secret?)))
    .collect()
}

/// The mounted Secrets that do not exist, each as a sentence. Metadata reads: the operator
/// never reads the data of a Secret it did not create.
async fn missing_secrets(client: &kube::Client, ns: &str, spec: &SpiceProxySpec) -> Result<Vec<String>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mounted = mounted_secrets(spec);
    let found = futures::future::try_join_all(mounted.iter().map(|(_, secret)| secrets.get_metadata_opt(secret))).await?;
    Ok(mounted.iter().zip(found).filter(|(_, found)| found.is_none()).map(|((field, secret), _)| format!("{field}: Secret {ns}/{secret} does not exist")).collect())
}

/// Status while a mounted Secret is missing (`why`) and nothing is applied. The children
/// applied before, when there are any, still tell how many replicas serve and where: running
/// pods keep the files they mounted, so engines keep the proxy's URL. Progressing and Degraded
/// say what is missing.
pub fn secrets_missing_status(spx: &SpiceProxy, why: &str, live: Option<(&Deployment, &Service, Option<&str>)>) -> SpiceProxyStatus {
    const WAITING: &str = "changes are applied once the Secret exists";
    let Some((deploy, svc, node_address)) = live else {
        return not_applied_status(spx, "SecretNotFound", why, "nothing applied until the Secret exists");
    };
    let generation = spx.metadata.generation;
    let mut status = build_status(spx, deploy, svc, node_address, &PodDiagnosis::NothingWrong);
    for c in &mut status.conditions {
        match c.type_.as_str() {
            "Progressing" => *c = conditions::new("Progressing", false, "SecretNotFound", WAITING, generation),
            "Degraded" => *c = conditions::new("Degraded", true, "SecretNotFound", why, generation),
            _ => {}
        }
    }
    status
}

/// Status when nothing is applied for `reason`: no URL is published for a spec that cannot run.
fn not_applied_status(spx: &SpiceProxy, reason: &str, why: &str, progressing: &str) -> SpiceProxyStatus {
    let generation = spx.metadata.generation;
    let previous = spx.status.clone().unwrap_or_default();
    SpiceProxyStatus {
        proxy_url: None,
        html5_url: None,
        ready_replicas: previous.ready_replicas,
        replicas: previous.replicas,
        // Pods of the last valid spec may still run, and an autoscaler still needs to find them.
        selector: Some(labels::proxy_selector_string(&spx.name_any())),
        observed_generation: generation,
        conditions: vec![
            conditions::new("Ready", false, reason, why, generation),
            conditions::new("Progressing", false, reason, progressing, generation),
            conditions::new("Degraded", true, reason, why, generation),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ExternalAddress, PortRange, TargetRule};
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    fn spx(yaml: &str) -> SpiceProxy {
        let mut s: SpiceProxy = serde_yaml::from_str(yaml).unwrap();
        s.metadata.uid = Some("uid-1".into());
        s.metadata.generation = Some(3);
        s
    }
    const BASIC: &str = "apiVersion: console.spice-operator.io/v1alpha1\nkind: SpiceProxy\nmetadata: {name: edge, namespace: spice}\nspec:\n  allowedTargets: [{cidr: 10.0.0.0/16, ports: [{from: 5900, to: 5999}]}]\n";

    fn deploy_with(ready: i32, replicas: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta { generation: Some(1), ..Default::default() },
            status: Some(DeploymentStatus {
                observed_generation: Some(1),
                ready_replicas: Some(ready),
                updated_replicas: Some(replicas),
                replicas: Some(replicas),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_the_ones_spice_clients_and_ops_expect() {
        let s = spx(BASIC);
        assert_eq!((s.spec.replicas, s.spec.service.port, s.spec.auth.mode), (1, 3128, AuthMode::Ticket));
        assert!(s.spec.limits.idle_timeout_seconds > 300);
        assert!(validate(&s.spec).is_ok());
    }

    #[test]
    fn build_makes_a_hardened_owned_deployment_and_service() {
        let s = spx(BASIC);
        let c = build(&s, "img:1").unwrap();
        let d = c.deployment.spec;
        assert_eq!(d.replicas, Some(1));
        let pod = d.template.spec.unwrap();
        let ctr = &pod.containers[0];
        assert_eq!(ctr.image.as_deref(), Some("img:1"));
        assert_eq!(ctr.args.as_deref().unwrap(), ["proxy", "--config", "/etc/spice-proxy/config/config.json", "--log-json"]);
        let sc = ctr.security_context.as_ref().unwrap();
        assert_eq!((sc.read_only_root_filesystem, sc.allow_privilege_escalation), (Some(true), Some(false)));
        assert_eq!(pod.termination_grace_period_seconds, Some(70));
        assert!(ctr.readiness_probe.is_some() && ctr.liveness_probe.is_some());
        let svc = c.service.spec.unwrap();
        assert_eq!((svc.type_.as_deref(), svc.ports.unwrap()[0].port), (Some("ClusterIP"), 3128));
        let pdb = c.disruption_budget.spec.unwrap();
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(pdb.selector.unwrap().match_labels, d.selector.match_labels);
        let cfg: ProxyConfig = serde_json::from_str(&c.config_map.data.unwrap()["config.json"]).unwrap();
        assert_eq!(cfg.allowed_targets[0].ports, vec![(5900, 5999)]);
        assert_eq!(cfg.allowed_targets[0].cidr.to_string(), "10.0.0.0/16");
    }

    #[test]
    fn config_change_changes_the_pod_template_hash() {
        let a = spx(BASIC);
        let mut b = a.clone();
        b.spec.allowed_targets.push(TargetRule { cidr: "10.9.0.0/24".into(), ports: vec![PortRange { from: 5900, to: None }] });
        let hash = |s: &SpiceProxy| build(s, "i").unwrap().deployment.spec.template.metadata.unwrap().annotations.unwrap()[labels::CONFIG_HASH].clone();
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(hash(&a), hash(&a.clone()));
    }

    #[test]
    fn the_applied_digest_changes_with_any_child_and_only_then() {
        let digest = |s: &SpiceProxy| build(s, "i").unwrap().digest().unwrap();
        let a = spx(BASIC);
        assert_eq!(digest(&a), digest(&a.clone()), "a rebuild of the same spec needs no rehearsal");
        // One change in each kind of child: the Service, the Deployment, the NetworkPolicy.
        let node_port = spx(&format!("{BASIC}  service: {{type: NodePort, nodePort: 30080}}\n"));
        let annotated = spx(&format!("{BASIC}  podAnnotations: {{a: b}}\n"));
        let open = spx(&format!("{BASIC}  networkPolicy: {{enabled: false}}\n"));
        let mut digests = vec![digest(&a), digest(&node_port), digest(&annotated), digest(&open), digest(&spx(&BASIC.replace("edge", "edge2")))];
        digests.sort();
        digests.dedup();
        assert_eq!(digests.len(), 5);
    }

    /// The children of BASIC (with its NetworkPolicy) as the API server returns them after this
    /// operator applied them: owned by the uid, stamped, and its managedFields naming every field.
    fn live_children() -> (Children, String) {
        let owner = OwnerReference { api_version: "v1".into(), kind: "SpiceProxy".into(), name: "edge".into(), uid: "p1".into(), ..Default::default() };
        let children = build(&spx(BASIC), "i").unwrap().owned_by(&owner);
        let digest = children.digest().unwrap();
        let mut live = children.stamped(&digest);
        fn every_field(value: &serde_json::Value) -> serde_json::Value {
            match value {
                serde_json::Value::Object(o) => o.iter().map(|(k, v)| (format!("f:{k}"), every_field(v))).collect(),
                _ => json!({}),
            }
        }
        for meta in live.metas_mut() {
            let mut object = serde_json::to_value(&*meta).unwrap();
            object.as_object_mut().unwrap().remove("name");
            meta.managed_fields = Some(vec![ManagedFieldsEntry {
                manager: Some(labels::FIELD_MANAGER.into()),
                operation: Some("Apply".into()),
                fields_v1: Some(FieldsV1(json!({"f:metadata": every_field(&object)}))),
                ..Default::default()
            }]);
        }
        // The specs too, as a whole (their fields are the applied ones: the server adds none here).
        let spec_too = |meta: &mut ObjectMeta| {
            let entry = &mut meta.managed_fields.as_mut().unwrap()[0];
            entry.fields_v1.as_mut().unwrap().0.as_object_mut().unwrap().extend([("f:spec".to_string(), json!({})), ("f:data".to_string(), json!({}))]);
        };
        live.metas_mut().for_each(spec_too);
        (live, digest)
    }

    #[test]
    fn children_applied_in_full_are_recalled_as_applied_and_others_not_at_all() {
        let (live, digest) = live_children();
        assert!(live.network_policy.is_some(), "the policy is on by default");
        let back = applied_in_full(live.clone(), "p1").expect("one set, all owned, all applied by the operator");
        assert_eq!(back.digest(), digest);
        assert_eq!(back.children().unwrap().unstamped().digest().unwrap(), digest, "exactly what was applied");

        assert!(applied_in_full(live.clone(), "someone-else").is_none(), "children of another SpiceProxy");
        let mut part_way = live.clone();
        part_way.service.metadata.annotations.as_mut().unwrap().insert(labels::APPLIED_SET.into(), "older".into());
        assert!(applied_in_full(part_way, "p1").is_none(), "an apply that stopped after the Deployment");
        let mut unstamped = live.clone();
        unstamped.disruption_budget.metadata.annotations = None;
        assert!(applied_in_full(unstamped, "p1").is_none(), "applied by an operator that did not stamp");
        let mut taken_over = live.clone();
        taken_over.deployment.metadata.managed_fields.as_mut().unwrap()[0].manager = Some("kubectl".into());
        assert!(applied_in_full(taken_over, "p1").is_none(), "no record of what the operator applied to the Deployment");
        let mut no_policy = live;
        no_policy.network_policy = None;
        assert!(applied_in_full(no_policy, "p1").expect("a set with its policy turned off").children().unwrap().network_policy.is_none());
    }

    #[test]
    fn the_applied_table_forgets_deleted_proxies_but_not_the_one_just_applied() {
        let (live, mut writer) = reflector::store::<DeserializeGuard<SpiceProxy>>();
        let proxy = |uid: &str| {
            let mut s = spx(BASIC);
            s.metadata.name = Some(format!("p-{uid}"));
            s.metadata.uid = Some(uid.into());
            DeserializeGuard(Ok(s))
        };
        for uid in ["a", "b"] {
            writer.apply_watcher_event(&watcher::Event::Apply(proxy(uid)));
        }
        let mut applied = HashMap::new();
        // Two live proxies allow 2 × 2 + 16 = 20 entries before a prune.
        for i in 0..20 {
            remember(&mut applied, &live, &format!("gone-{i}"), [0; 32]);
        }
        remember(&mut applied, &live, "a", [1; 32]);
        assert_eq!(applied.len(), 1, "the deleted ones are dropped: {:?}", applied.keys().collect::<Vec<_>>());
        remember(&mut applied, &live, "b", [2; 32]);
        assert_eq!(applied.get("a"), Some(&[1; 32]));
        // Pruning keeps the one being recorded even before the cache has seen it.
        // a, b and 18 more make 20; the 19th more makes 21 and prunes the other 18.
        for i in 0..19 {
            remember(&mut applied, &live, &format!("new-{i}"), [3; 32]);
        }
        assert!(applied.contains_key("new-18") && applied.contains_key("a") && applied.contains_key("b"), "{:?}", applied.keys().collect::<Vec<_>>());
        assert_eq!(applied.len(), 3);
    }

    #[test]
    fn a_refused_apply_names_quota_permission_or_the_servers_reason() {
        let refusal = |code: u16, message: &str| {
            let e = kube::core::Status { code, message: message.into(), reason: "Forbidden".into(), ..Default::default() };
            let st = apply_failed_status(&spx(BASIC), &e);
            let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap().clone();
            assert_eq!(ready.status, "False");
            assert!(ready.message.contains(message), "{}", ready.message);
            ready.reason
        };
        let quota = r#"services "edge" is forbidden: exceeded quota: lb, requested: services.loadbalancers=1, used: services.loadbalancers=0, limited: services.loadbalancers=0"#;
        assert_eq!(refusal(403, quota), "QuotaExceeded");
        assert_eq!(refusal(403, r#"services "edge" is forbidden: User "x" cannot patch resource "services""#), "Forbidden");
        assert_eq!(refusal(422, r#"Service "edge" is invalid: spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated"#), "ApplyFailed");
    }

    #[test]
    fn validate_reports_every_problem() {
        let mut s = spx(BASIC);
        s.spec.allowed_targets = vec![];
        s.spec.auth.mode = AuthMode::Basic;
        s.spec.external_address = Some(ExternalAddress { host: "fd00::1".into(), port: None });
        let problems = validate(&s.spec).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("never an open proxy"));
        assert!(problems[2].contains("IPv6"));
        let mut s = spx(BASIC);
        s.spec.allowed_targets[0].cidr = "10.0.0.0/33".into();
        s.spec.allowed_targets[0].ports[0] = PortRange { from: 6000, to: Some(5900) };
        assert_eq!(validate(&s.spec).unwrap_err().len(), 2);
        let mut s = spx(BASIC);
        s.spec.limits.dead_peer_timeout_seconds = 5;
        assert_eq!(validate(&s.spec).unwrap_err(), ["limits.deadPeerTimeoutSeconds 5 is outside 10-3600"]);
        let mut s = spx(BASIC);
        s.spec.limits.half_closed_timeout_seconds = 0;
        assert_eq!(validate(&s.spec).unwrap_err(), ["limits.halfClosedTimeoutSeconds 0 must be at least 1"]);
        let mut s = spx(BASIC);
        s.spec.limits.max_auth_failures_per_client = -1;
        s.spec.limits.auth_failure_window_seconds = 0;
        assert_eq!(validate(&s.spec).unwrap_err(), ["limits.maxAuthFailuresPerClient -1 must be 0 (off) or more", "limits.authFailureWindowSeconds 0 is outside 1-86400"]);
        s.spec.limits.max_auth_failures_per_client = 0;
        s.spec.limits.auth_failure_window_seconds = 86_400;
        assert!(validate(&s.spec).is_ok(), "0 is off, a day is the longest window");
    }

    #[test]
    fn load_balancers_keep_client_addresses_by_default_and_node_ports_need_an_address_for_it() {
        let policy = |service: &str| {
            let s = spx(&format!("{BASIC}  service: {service}\n  externalAddress: {{host: console.example.com}}\n"));
            assert!(validate(&s.spec).is_ok(), "{:?}", validate(&s.spec));
            build(&s, "i").unwrap().service.spec.unwrap().external_traffic_policy
        };
        assert_eq!(policy("{type: LoadBalancer}").as_deref(), Some("Local"));
        assert_eq!(policy("{type: LoadBalancer, externalTrafficPolicy: Cluster}").as_deref(), Some("Cluster"));
        assert_eq!(policy("{type: NodePort}").as_deref(), Some("Cluster"));
        assert_eq!(policy("{type: NodePort, externalTrafficPolicy: Local}").as_deref(), Some("Local"));
        assert_eq!(policy("{type: ClusterIP}"), None, "the API server refuses the field on a ClusterIP Service");
        let families = |service: &str| build(&spx(&format!("{BASIC}  service: {service}\n")), "i").unwrap().service.spec.unwrap().ip_family_policy;
        assert_eq!(families("{type: LoadBalancer}").as_deref(), Some("SingleStack"), "absent: what Kubernetes defaults to, applied");
        assert_eq!(families("{type: LoadBalancer, ipFamilyPolicy: PreferDualStack}").as_deref(), Some("PreferDualStack"));

        let s = spx(&format!("{BASIC}  service: {{type: NodePort, externalTrafficPolicy: Local}}\n"));
        let problems = validate(&s.spec).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("service.externalTrafficPolicy Local with type NodePort needs externalAddress"), "{problems:?}");
        let s = spx(&format!("{BASIC}  service: {{externalTrafficPolicy: Local}}\n"));
        assert_eq!(validate(&s.spec).unwrap_err(), ["service.externalTrafficPolicy needs service type NodePort or LoadBalancer"]);
    }

    #[test]
    fn the_proxy_protocol_reaches_the_proxy_config_and_bad_cidrs_are_reported() {
        let s = spx(&format!("{BASIC}  service: {{type: LoadBalancer, proxyProtocol: {{trustedCidrs: [10.0.0.0/24, \"2001:db8::/64\"]}}}}\n"));
        assert!(validate(&s.spec).is_ok(), "{:?}", validate(&s.spec));
        let pp = proxy_config(&s.spec).proxy_protocol.expect("in the replica's config");
        assert!(pp.trusts("10.0.0.7".parse().unwrap()) && pp.trusts("2001:db8::1".parse().unwrap()) && !pp.trusts("10.0.1.7".parse().unwrap()));
        assert_eq!(proxy_config(&spx(BASIC).spec).proxy_protocol, None, "off unless asked for");
        let s = spx(&format!("{BASIC}  service: {{type: LoadBalancer, proxyProtocol: {{trustedCidrs: [10.0.0.0/33]}}}}\n"));
        assert_eq!(validate(&s.spec).unwrap_err(), ["service.proxyProtocol.trustedCidrs[0] \"10.0.0.0/33\" is not a CIDR such as 10.0.0.0/16"]);
        let s = spx(&format!("{BASIC}  service: {{type: LoadBalancer, proxyProtocol: {{trustedCidrs: []}}}}\n"));
        assert!(validate(&s.spec).unwrap_err()[0].starts_with("service.proxyProtocol.trustedCidrs is empty"));
    }

    /// Policies publish the URL of a Ready proxy only: while some replicas serve (a rollout, a
    /// scale-up, a replica lost) it stays Ready, and Progressing and Degraded say the rest.
    #[test]
    fn a_proxy_stays_ready_while_some_replicas_serve() {
        let s = spx(&format!("{BASIC}  replicas: 2\n  externalAddress: {{host: console.example.com}}\n"));
        let svc = build(&s, "i").unwrap().service;
        let of = |st: &SpiceProxyStatus, t: &str| {
            let c = st.conditions.iter().find(|c| c.type_ == t).unwrap();
            (c.status.clone(), c.reason.clone(), c.message.clone())
        };
        let st = build_status(&s, &deploy_with(1, 2), &svc, None, &PodDiagnosis::NothingWrong);
        assert_eq!(of(&st, "Ready"), ("True".into(), "ProxyReady".into(), "1/2 replicas ready at http://console.example.com:3128".into()));
        assert_eq!(of(&st, "Progressing").1, "RollingOut");
        assert_eq!(st.proxy_url.as_deref(), Some("http://console.example.com:3128"));
        // The new replica crashes: still serving, and Degraded says why.
        let crashing = PodDiagnosis::Problem { pod: "edge-b".into(), reason: "CrashLoopBackOff".into(), message: "container proxy: back-off".into(), others: 0 };
        let st = build_status(&s, &deploy_with(1, 2), &svc, None, &crashing);
        assert_eq!(of(&st, "Ready").0, "True");
        assert!(of(&st, "Ready").2.ends_with("; pod edge-b: CrashLoopBackOff: container proxy: back-off"), "{:?}", of(&st, "Ready"));
        assert_eq!((of(&st, "Degraded").0, of(&st, "Degraded").1), ("True".into(), "CrashLoopBackOff".into()));
        // None serving: not Ready, and no policy publishes its URL.
        let st = build_status(&s, &deploy_with(0, 2), &svc, None, &crashing);
        assert_eq!((of(&st, "Ready").0, of(&st, "Ready").1), ("False".into(), "ReplicasNotReady".into()));
        let mut not_ready = s.clone();
        not_ready.status = Some(st);
        assert!(not_ready.ready_url().unwrap_err().starts_with("is not Ready (ReplicasNotReady: 0/2 replicas ready"));
    }

    /// The dereference step checks exactly the Secrets the pods mount (besides the ticket key,
    /// which the operator makes itself), and while one is missing the children applied before
    /// still say how many replicas serve and where.
    #[test]
    fn every_mounted_secret_is_checked_and_a_missing_one_keeps_the_url_of_what_runs() {
        let yaml = format!(
            "{BASIC}  auth: {{credentialsSecret: users}}\n  externalAddress: {{host: console.example.com}}\n  html5: {{tlsSecret: console-cert, upstreamTls: {{caSecret: hv-ca}}}}\n"
        );
        let s = spx(&yaml);
        assert!(validate(&s.spec).is_ok(), "{:?}", validate(&s.spec));
        let children = build(&s, "i").unwrap();
        let pod = children.deployment.spec.template.spec.clone().unwrap();
        let mut mounted: Vec<String> = pod.volumes.unwrap().iter().filter_map(|v| v.secret.as_ref()?.secret_name.clone()).filter(|n| *n != key_secret_name("edge")).collect();
        mounted.sort();
        assert_eq!(mounted, ["console-cert", "hv-ca", "users"]);
        assert_eq!(
            mounted_secrets(&s.spec),
            [("auth.credentialsSecret", "users"), ("html5.tlsSecret", "console-cert"), ("html5.upstreamTls.caSecret", "hv-ca")]
        );
        assert!(mounted_secrets(&spx(BASIC).spec).is_empty());

        let why = "html5.upstreamTls.caSecret: Secret spice/hv-ca does not exist";
        // Never applied: nothing runs, no URL.
        let st = secrets_missing_status(&s, why, None);
        let reasons: Vec<_> = st.conditions.iter().map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str())).collect();
        assert_eq!(reasons, [("Ready", "False", "SecretNotFound"), ("Progressing", "False", "SecretNotFound"), ("Degraded", "True", "SecretNotFound")]);
        assert!(st.conditions.iter().all(|c| c.observed_generation == Some(3)));
        assert_eq!((st.proxy_url, st.conditions[2].message.as_str()), (None, why));
        // Applied before, its pods running: they keep the files they mounted, and the URL stays.
        let st = secrets_missing_status(&s, why, Some((&deploy_with(1, 1), &children.service, None)));
        let reasons: Vec<_> = st.conditions.iter().map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str())).collect();
        assert_eq!(reasons[..3], [("Ready", "True", "ProxyReady"), ("Progressing", "False", "SecretNotFound"), ("Degraded", "True", "SecretNotFound")]);
        assert_eq!((st.proxy_url.as_deref(), st.ready_replicas), (Some("http://console.example.com:3128"), 1));
        assert_eq!(st.conditions[1].message, "changes are applied once the Secret exists");
        assert_eq!(st.conditions[2].message, why);
    }

    #[test]
    fn html5_adds_a_port_a_config_and_a_console_url() {
        let mut s = spx(&format!("{BASIC}  html5: {{allowedOrigins: [\"https://portal.example.com\"]}}\n  externalAddress: {{host: console.example.com}}\n"));
        assert!(validate(&s.spec).is_ok(), "{:?}", validate(&s.spec));
        let c = build(&s, "i").unwrap();
        let svc_ports = c.service.spec.as_ref().unwrap().ports.clone().unwrap();
        assert_eq!(svc_ports.iter().map(|p| (p.name.clone().unwrap(), p.port)).collect::<Vec<_>>(), vec![("proxy".into(), 3128), ("html5".into(), 6082)]);
        let ctr_ports = c.deployment.spec.template.spec.unwrap().containers[0].ports.clone().unwrap();
        assert!(ctr_ports.iter().any(|p| p.name.as_deref() == Some("html5") && p.container_port == 6082));
        let cfg: ProxyConfig = serde_json::from_str(&c.config_map.data.unwrap()["config.json"]).unwrap();
        let h = cfg.html5.unwrap();
        assert_eq!((h.listen.as_str(), h.allowed_origins.len()), ("[::]:6082", 1));
        let st = build_status(&s, &deploy_with(1, 1), &c.service, None, &PodDiagnosis::NothingWrong);
        assert_eq!(st.html5_url.as_deref(), Some("http://console.example.com:6082/spice_auto.html"));
        let enc = st.conditions.iter().find(|c| c.type_ == "Html5Encrypted").unwrap();
        assert_eq!((enc.status.as_str(), enc.reason.as_str()), ("False", "PlainWebSocket"));
        // With a certificate: https, and the condition says the tokens are protected.
        let mut tls = s.clone();
        tls.spec.html5.as_mut().unwrap().tls_secret = Some("console-cert".into());
        let c = build(&tls, "i").unwrap();
        let pod = c.deployment.spec.template.spec.unwrap();
        assert!(pod.volumes.unwrap().iter().any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("console-cert")));
        let cfg: ProxyConfig = serde_json::from_str(&c.config_map.data.unwrap()["config.json"]).unwrap();
        assert_eq!(cfg.html5.unwrap().tls.unwrap().cert_file, "/etc/spice-proxy/html5-tls/tls.crt");
        let st = build_status(&tls, &deploy_with(1, 1), &c.service, None, &PodDiagnosis::NothingWrong);
        assert_eq!(st.html5_url.as_deref(), Some("https://console.example.com:6082/spice_auto.html"));
        assert!(conditions::is_true(&st.conditions, "Html5Encrypted"));
        // TLS to the hypervisors: the CA Secret is mounted and the bridge told where.
        tls.spec.html5.as_mut().unwrap().upstream_tls = Some(crate::crd::UpstreamTlsSpec { ca_secret: "hv-ca".into(), host_subject: Some("O=example,CN=host1".into()) });
        let c = build(&tls, "i").unwrap();
        let cfg: ProxyConfig = serde_json::from_str(&c.config_map.data.unwrap()["config.json"]).unwrap();
        let up = cfg.html5.unwrap().upstream_tls.unwrap();
        assert_eq!((up.ca_file.as_str(), up.host_subject.as_deref()), ("/etc/spice-proxy/hypervisor-ca/ca.crt", Some("O=example,CN=host1")));
        let vols = c.deployment.spec.template.spec.unwrap().volumes.unwrap();
        assert!(vols.iter().any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("hv-ca")));
        // Without html5: no port, no URL, no condition.
        let plain = spx(BASIC);
        let st = build_status(&plain, &deploy_with(1, 1), &build(&plain, "i").unwrap().service, None, &PodDiagnosis::NothingWrong);
        assert!(st.html5_url.is_none() && st.conditions.iter().all(|c| c.type_ != "Html5Encrypted"));
        // The browser path needs tickets, a port of its own and real origins.
        s.spec.auth.mode = AuthMode::None;
        s.spec.html5.as_mut().unwrap().port = 3128;
        s.spec.html5.as_mut().unwrap().allowed_origins.push("portal.example.com/app".into());
        assert_eq!(validate(&s.spec).unwrap_err().len(), 3, "{:?}", validate(&s.spec));
    }

    #[test]
    fn url_from_external_address_load_balancer_and_cluster_ip() {
        let mut s = spx(BASIC);
        let svc = Service::default();
        assert_eq!(derive_url(&s, &svc, None).unwrap(), "http://edge.spice.svc:3128");
        s.spec.service.type_ = ServiceType::LoadBalancer;
        assert!(matches!(derive_url(&s, &svc, None), Err((false, _))));
        let lb = |ip: &str| Service {
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus { ingress: Some(vec![LoadBalancerIngress { ip: Some(ip.into()), ..Default::default() }]) }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(derive_url(&s, &lb("203.0.113.7"), None).unwrap(), "http://203.0.113.7:3128");
        let err = derive_url(&s, &lb("2001:db8::7"), None).unwrap_err();
        assert!(err.0 && err.1.contains("IPv6"), "{err:?}");
        s.spec.external_address = Some(ExternalAddress { host: "Console.Example.com".into(), port: Some(8080) });
        assert_eq!(derive_url(&s, &lb("2001:db8::7"), None).unwrap(), "http://console.example.com:8080");
    }

    fn pod(name: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name}, "status": status})).unwrap()
    }

    #[test]
    fn pods_say_why_replicas_are_not_ready() {
        let unschedulable = pod("edge-b", json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."}]}));
        let pulling = pod("edge-a", json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "proxy", "image": "r.example/x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"r.example/x\""}}}]}));
        let crashing = pod("edge-c", json!({"phase": "Running", "containerStatuses": [{"name": "proxy", "image": "x", "imageID": "", "ready": false, "restartCount": 4,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 1m20s restarting failed container=proxy"}},
            "lastState": {"terminated": {"exitCode": 2, "reason": "Error"}}}]}));
        let starting = pod("edge-0", json!({"phase": "Pending", "containerStatuses": [{"name": "proxy", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating"}}}]}));
        let mut leaving = unschedulable.clone();
        leaving.metadata.name = Some("edge-0-old".into());
        leaving.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()));

        assert_eq!(diagnose_pods(&[starting.clone(), leaving.clone()]), PodDiagnosis::NothingWrong, "starting and terminating pods are no problem");
        let d = diagnose_pods(&[unschedulable.clone(), starting.clone(), pulling.clone(), crashing.clone()]);
        assert_eq!(d, PodDiagnosis::Problem {
            pod: "edge-a".into(), reason: "ImagePullBackOff".into(), message: "container proxy: Back-off pulling image \"r.example/x\"".into(), others: 2,
        });
        let PodDiagnosis::Problem { reason, message, .. } = diagnose_pods(std::slice::from_ref(&crashing)) else { panic!() };
        assert_eq!((reason.as_str(), message.as_str()), ("CrashLoopBackOff", "container proxy: back-off 1m20s restarting failed container=proxy (last exit code 2)"));
        // The error the proxy wrote as its termination message, first line, is quoted.
        let mut said = crashing;
        said.status.as_mut().unwrap().container_statuses.as_mut().unwrap()[0].last_state.as_mut().unwrap().terminated.as_mut().unwrap().message =
            Some("\nbrowser-side TLS: cannot read /etc/spice-proxy/html5-tls/tls.crt: No such file or directory (os error 2)\nmore\n".into());
        let PodDiagnosis::Problem { message, .. } = diagnose_pods(&[said]) else { panic!() };
        assert_eq!(
            message,
            "container proxy: back-off 1m20s restarting failed container=proxy (last exit code 2: browser-side TLS: cannot read /etc/spice-proxy/html5-tls/tls.crt: No such file or directory (os error 2))"
        );

        // Ready says how many are ready and why not; Degraded carries the kubelet's or scheduler's reason.
        let s = spx(BASIC);
        let st = build_status(&s, &deploy_with(0, 1), &Service::default(), None, &diagnose_pods(&[unschedulable, starting]));
        let cond = |t: &str| st.conditions.iter().find(|c| c.type_ == t).unwrap().clone();
        assert_eq!((cond("Ready").status.as_str(), cond("Ready").reason.as_str()), ("False", "ReplicasNotReady"));
        assert_eq!(cond("Ready").message, "0/1 replicas ready; pod edge-b: Unschedulable: 0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector.");
        assert_eq!((cond("Degraded").status.as_str(), cond("Degraded").reason.as_str()), ("True", "Unschedulable"));
        assert_eq!(cond("Degraded").message, "pod edge-b: Unschedulable: 0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector.");

        // Without the right to list pods the status says so and stays otherwise intact.
        let st = build_status(&s, &deploy_with(0, 1), &Service::default(), None, &PodDiagnosis::Unreadable("403 Forbidden: pods is forbidden".into()));
        let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.message, "0/1 replicas ready (cannot list its pods to say why: 403 Forbidden: pods is forbidden)");
        assert!(!conditions::is_true(&st.conditions, "Degraded"));
    }

    #[test]
    fn the_network_policy_lets_pods_reach_only_the_allowed_targets_and_dns() {
        let mut s = spx(BASIC);
        s.spec.allowed_targets.push(serde_yaml::from_str("{cidr: 192.0.2.77/24, ports: [{from: 5900}, {from: 6000, to: 6010}]}").unwrap());
        let policy = build(&s, "i").unwrap().network_policy.expect("on by default");
        assert_eq!(policy.metadata.name.as_deref(), Some("edge-egress"));
        let spec = policy.spec.unwrap();
        assert_eq!(spec.pod_selector.unwrap().match_labels, Some(labels::proxy_selector("edge")));
        assert_eq!(spec.policy_types, Some(vec!["Egress".to_string()]), "ingress stays open to clients");
        type Ports = Vec<(String, i32, Option<i32>)>;
        let rules: Vec<(Option<String>, Ports)> = spec
            .egress
            .unwrap()
            .into_iter()
            .map(|r| {
                let to = r.to.map(|peers| peers[0].ip_block.clone().unwrap().cidr);
                let ports = r.ports.unwrap().into_iter().map(|p| {
                    let IntOrString::Int(n) = p.port.unwrap() else { panic!() };
                    (p.protocol.unwrap(), n, p.end_port)
                });
                (to, ports.collect())
            })
            .collect();
        let tcp = |from, to| ("TCP".to_string(), from, to);
        assert_eq!(rules, vec![
            (Some("10.0.0.0/16".into()), vec![tcp(5900, Some(5999))]),
            (Some("192.0.2.0/24".into()), vec![tcp(5900, None), tcp(6000, Some(6010))]),
            (None, vec![("UDP".into(), 53, None), tcp(53, None)]),
        ]);
        let off = spx(&format!("{BASIC}  networkPolicy: {{enabled: false}}\n"));
        assert_eq!(build(&off, "i").unwrap().network_policy, None);
    }

    #[test]
    fn pod_labels_annotations_and_priority_reach_the_pods_without_taking_the_operators_keys() {
        let s = spx(&format!(
            "{BASIC}  podLabels: {{team: vdi}}\n  podAnnotations: {{sidecar.istio.io/inject: \"false\"}}\n  priorityClassName: consoles\n"
        ));
        assert!(validate(&s.spec).is_ok(), "{:?}", validate(&s.spec));
        let template = build(&s, "i").unwrap().deployment.spec.template;
        let meta = template.metadata.unwrap();
        let labels = meta.labels.unwrap();
        assert_eq!(labels["team"], "vdi");
        assert_eq!(labels[labels::INSTANCE], "edge");
        let annotations = meta.annotations.unwrap();
        assert_eq!(annotations["sidecar.istio.io/inject"], "false");
        assert!(annotations.contains_key(labels::CONFIG_HASH));
        assert_eq!(template.spec.unwrap().priority_class_name.as_deref(), Some("consoles"));

        let s = spx(&format!(
            "{BASIC}  podLabels: {{app.kubernetes.io/instance: other, app.kubernetes.io/name: x}}\n  podAnnotations: {{console.spice-operator.io/config-hash: x}}\n"
        ));
        assert_eq!(validate(&s.spec).unwrap_err(), [
            "podLabels: app.kubernetes.io/instance is set by the operator on every proxy pod",
            "podLabels: app.kubernetes.io/name is set by the operator on every proxy pod",
            "podAnnotations: console.spice-operator.io/config-hash is set by the operator (it rolls the pods when the configuration changes)",
        ]);
    }

    #[test]
    fn replicas_spread_over_nodes_by_default_and_as_told_otherwise() {
        let spread = |s: &SpiceProxy| build(s, "i").unwrap().deployment.spec.template.spec.unwrap().topology_spread_constraints.unwrap();
        let own = Some(LabelSelector { match_labels: Some(labels::proxy_selector("edge")), ..Default::default() });
        let default = spread(&spx(BASIC));
        assert_eq!(default.len(), 1);
        assert_eq!((default[0].topology_key.as_str(), default[0].max_skew, default[0].when_unsatisfiable.as_str()), ("kubernetes.io/hostname", 1, "ScheduleAnyway"));
        assert_eq!(default[0].label_selector, own);

        // Zones, strictly: the user's constraint replaces the default and counts this proxy's pods;
        // one naming its own selector keeps it.
        let s = spx(&format!(
            "{BASIC}  topologySpreadConstraints:\n  - {{maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: DoNotSchedule}}\n  - {{maxSkew: 2, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: ScheduleAnyway, labelSelector: {{matchLabels: {{team: vdi}}}}}}\n"
        ));
        let told = spread(&s);
        assert_eq!((told[0].topology_key.as_str(), told[0].when_unsatisfiable.as_str()), ("topology.kubernetes.io/zone", "DoNotSchedule"));
        assert_eq!(told[0].label_selector, own);
        assert_eq!(told[1].label_selector.as_ref().unwrap().match_labels.as_ref().unwrap()["team"], "vdi");
        assert_eq!(told.len(), 2);
    }

    #[test]
    fn a_stalled_rollout_is_degraded_unless_the_pods_say_more() {
        let s = spx(BASIC);
        let mut stalled = deploy_with(1, 2);
        stalled.status.as_mut().unwrap().conditions = Some(vec![k8s_openapi::api::apps::v1::DeploymentCondition {
            type_: Some("Progressing".into()),
            status: Some("False".into()),
            reason: Some("ProgressDeadlineExceeded".into()),
            message: Some("ReplicaSet \"edge-5d8\" has timed out progressing.".into()),
            ..Default::default()
        }]);
        let mut two = s.clone();
        two.spec.replicas = 2;
        let st = build_status(&two, &stalled, &Service::default(), None, &PodDiagnosis::NothingWrong);
        let degraded = st.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "ProgressDeadlineExceeded"));
        assert_eq!(degraded.message, "1/2 replicas ready: ReplicaSet \"edge-5d8\" has timed out progressing.");
        let crashing = PodDiagnosis::Problem { pod: "edge-5d8-x".into(), reason: "CrashLoopBackOff".into(), message: "container proxy: back-off".into(), others: 0 };
        let st = build_status(&two, &stalled, &Service::default(), None, &crashing);
        assert_eq!(st.conditions.iter().find(|c| c.type_ == "Degraded").unwrap().reason, "CrashLoopBackOff", "the pod's own reason says more");
    }

    #[test]
    fn pod_reasons_fit_a_condition_and_long_messages_are_clipped() {
        let weird = pod("p", json!({"containerStatuses": [{"name": "proxy", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "not a reason!", "message": "m".repeat(1000)}}}]}));
        let PodDiagnosis::Problem { reason, message, .. } = diagnose_pods(&[weird]) else { panic!() };
        assert_eq!(reason, "ContainerNotStarting");
        assert_eq!(message.chars().count(), POD_MESSAGE_MAX + 1, "clipped, with an ellipsis");
        assert!(message.ends_with('…'));
    }

    #[test]
    fn image_pull_secrets_reach_the_pods_and_bad_names_are_reported() {
        let s = spx(&format!("{BASIC}  imagePullSecrets: [{{name: regcred}}, {{name: mirror.example}}]\n"));
        assert!(validate(&s.spec).is_ok(), "{:?}", validate(&s.spec));
        let pod_spec = build(&s, "i").unwrap().deployment.spec.template.spec.unwrap();
        let names: Vec<String> = pod_spec.image_pull_secrets.unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["regcred", "mirror.example"]);
        assert_eq!(build(&spx(BASIC), "i").unwrap().deployment.spec.template.spec.unwrap().image_pull_secrets, None);
        let s = spx(&format!("{BASIC}  imagePullSecrets: [{{name: RegCred}}, {{name: \"\"}}, {{name: ok}}]\n"));
        assert_eq!(validate(&s.spec).unwrap_err(), [
            "imagePullSecrets[0].name \"RegCred\" is not a Secret name (lower-case letters, digits, '-' and '.')",
            "imagePullSecrets[1].name \"\" is not a Secret name (lower-case letters, digits, '-' and '.')",
        ]);
    }

    #[test]
    fn status_ready_only_when_rolled_out_with_a_url() {
        let s = spx(BASIC);
        let st = build_status(&s, &deploy_with(0, 1), &Service::default(), None, &PodDiagnosis::NothingWrong);
        assert!(!conditions::is_true(&st.conditions, "Ready"));
        assert!(conditions::is_true(&st.conditions, "Progressing"));
        assert_eq!(st.proxy_url.as_deref(), Some("http://edge.spice.svc:3128"));
        let st = build_status(&s, &deploy_with(1, 1), &Service::default(), None, &PodDiagnosis::NothingWrong);
        assert!(conditions::is_true(&st.conditions, "Ready"));
        assert!(!conditions::is_true(&st.conditions, "Progressing"));
        assert!(!conditions::is_true(&st.conditions, "Degraded"));
        assert_eq!((st.ready_replicas, st.observed_generation), (1, Some(3)));
        let mut v6 = s.clone();
        v6.spec.service.type_ = ServiceType::LoadBalancer;
        let svc = Service {
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus { ingress: Some(vec![LoadBalancerIngress { ip: Some("::1".into()), ..Default::default() }]) }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let st = build_status(&v6, &deploy_with(1, 1), &svc, None, &PodDiagnosis::NothingWrong);
        assert_eq!(st.proxy_url, None);
        assert!(conditions::is_true(&st.conditions, "Degraded"));
        assert_eq!(st.conditions[0].reason, "UnusableAddress");
        // Dual-stack: the IPv4 address the load balancer lists second is the one published.
        let mut dual = svc.clone();
        let ingress = |ip: &str| LoadBalancerIngress { ip: Some(ip.into()), ..Default::default() };
        dual.status.as_mut().unwrap().load_balancer = Some(LoadBalancerStatus { ingress: Some(vec![ingress("2001:db8::10"), ingress("192.0.2.10")]) });
        let st = build_status(&v6, &deploy_with(1, 1), &dual, None, &PodDiagnosis::NothingWrong);
        assert_eq!(st.proxy_url.as_deref(), Some("http://192.0.2.10:3128"));
        assert!(conditions::is_true(&st.conditions, "Ready"));
    }
}
