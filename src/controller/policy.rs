//! ClusterConsolePolicy reconciler: resolves every cluster, pool and opted-out VM (pure, in
//! `crate::resolve`) against the SpiceProxy cache and writes the result into status.
//! A SpiceProxy change re-resolves exactly the policies that refer to it (watch + map, no polling).

use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use kube::api::{Patch, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use super::{Context, Error, Result, backoff_key, dropped_on, publish_transitions, retry_after_failure, status_patch_params, trigger};
use crate::{conditions, labels};
use crate::crd::{ClusterConsolePolicy, ClusterConsolePolicyStatus, SpiceProxy, SpiceProxyRef};
use crate::metrics::ControllerLabel;
use crate::resolve::{self, Resolved};

const LABEL: ControllerLabel = ControllerLabel { controller: "clusterconsolepolicy" };

pub async fn controller(
    ctx: Arc<Context>,
    proxy_events: impl Stream<Item = DeserializeGuard<SpiceProxy>> + Send + 'static,
    shutdown: watch::Receiver<bool>,
) {
    let (policies, writer) = reflector::store();
    ctx.metrics.report_policies(policies.clone());
    let api = Api::<DeserializeGuard<ClusterConsolePolicy>>::all(ctx.client.clone());
    // managedFields are never read here, and a big policy's are large (a 2,000-pool policy's
    // creator alone has about 120 KB of them): not kept in the cache.
    let watch = watcher(api, watcher::Config::default()).modify(|g| g.meta_mut().managed_fields = None);
    let changes = reflector(writer, watch).applied_objects();
    let controller = Controller::for_stream(trigger(changes, "ClusterConsolePolicy".into(), ctx.metrics.clone(), &shutdown), policies.clone());
    let mapper = move |proxy: DeserializeGuard<SpiceProxy>| {
        let key = SpiceProxyRef {
            name: proxy.0.as_ref().map(|p| p.name_any()).unwrap_or_else(|e| e.metadata.name.clone().unwrap_or_default()),
            namespace: proxy.0.as_ref().ok().and_then(|p| p.namespace()).or_else(|| proxy.0.as_ref().err().and_then(|e| e.metadata.namespace.clone())).unwrap_or_default(),
        };
        policies
            .state()
            .into_iter()
            .filter(|p| p.0.as_ref().is_ok_and(|p| p.spec.proxy_refs().any(|r| *r == key)))
            .map(|p| ObjectRef::from_obj(&*p))
            .collect::<Vec<_>>()
    };
    // proxy_events has its failures kept out where it is made (it also fills the lookup table).
    controller
        .watches_stream(dropped_on(proxy_events, shutdown).map(Ok::<_, watcher::Error>), mapper)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "policy reconcile trigger");
            }
        })
        .await;
}

fn error_policy(obj: Arc<DeserializeGuard<ClusterConsolePolicy>>, error: &Error, ctx: Arc<Context>) -> Action {
    retry_after_failure(&obj, error, &ctx, &LABEL)
}

async fn reconcile(guard: Arc<DeserializeGuard<ClusterConsolePolicy>>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciles.get_or_create(&LABEL).inc();
    let started = Instant::now();
    let api: Api<DeserializeGuard<ClusterConsolePolicy>> = Api::all(ctx.client.clone());
    let result = match &guard.0 {
        Ok(policy) => {
            // Resolve against a complete cache only: a half-listed cache would report proxies missing.
            ctx.proxies_ready.clone().wait_for(|ready| *ready).await.map_err(|_| Error::CacheNotReady)?;
            let lookup = StoreDirectory(&ctx.proxies);
            let resolved = resolve::resolve(&policy.spec, &lookup);
            let previous = policy.status.clone().unwrap_or_default();
            let status = build_status(&previous, resolved, policy.metadata.generation);
            let changed = status != previous;
            tracing::debug!(policy = %policy.name_any(), generation = ?policy.metadata.generation, changed, "policy resolved");
            if !changed {
                Ok(Action::await_change())
            } else {
                match write_status(&ctx.client, policy, &status).await {
                    Ok(()) => {
                        publish_transitions(&ctx, &policy.object_ref(&()), &previous.conditions, &status.conditions).await;
                        Ok(Action::await_change())
                    }
                    Err(e) if is_conflict(&e) => Ok(stale_resolution(policy)),
                    // Every entry does not fit in one object: say so in a status that does,
                    // rather than fail (and leave the old entries standing) for ever.
                    Err(kube::Error::Api(e)) if is_too_large(&e) => {
                        let bytes = serde_json::to_vec(&status).map(|v| v.len()).unwrap_or_default();
                        let short = too_large_status(&previous, &status, bytes, &e.message);
                        tracing::warn!(policy = %policy.name_any(), bytes, error = %e.message, "resolved status does not fit in the object");
                        let written = if short == previous { Ok(()) } else { write_status(&ctx.client, policy, &short).await };
                        match written {
                            Ok(()) => {
                                publish_transitions(&ctx, &policy.object_ref(&()), &previous.conditions, &short.conditions).await;
                                Ok(Action::await_change())
                            }
                            Err(e) if is_conflict(&e) => Ok(stale_resolution(policy)),
                            Err(e) => Err(e.into()),
                        }
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
        Err(invalid) => {
            let Some(name) = &invalid.metadata.name else { return Ok(Action::await_change()) };
            let generation = invalid.metadata.generation;
            let msg = format!("cannot decode the policy: {}", invalid.error);
            let cond = conditions::new("Ready", false, "InvalidSpec", msg, generation);
            let patch = Patch::Merge(json!({"status": {"conditions": [cond], "observedGeneration": generation}}));
            api.patch_status(name, &status_patch_params(), &patch).await?;
            Ok(Action::await_change())
        }
    };
    ctx.metrics.duration.get_or_create(&LABEL).observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.backoff.succeeded(&backoff_key(guard.as_ref()));
    }
    result
}

/// Replaces the status of exactly the version that was resolved (a PUT with its resourceVersion,
/// 409 when the policy changed since). The body is the status alone: the API server keeps
/// everything else from the stored object. A PUT also costs the API server less than a merge
/// patch of the same status: it need not encode the stored object to apply a patch to it, which
/// on a 2,000-pool policy is a large share of each write. The body is serialised straight from
/// the status, and the answer (the whole stored object, hundreds of KB with its managedFields)
/// is checked for errors and skipped rather than decoded: both were transient copies of the
/// object that set the operator's peak memory.
async fn write_status(client: &Client, policy: &ClusterConsolePolicy, status: &ClusterConsolePolicyStatus) -> kube::Result<()> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct StatusOnly<'a> {
        api_version: String,
        kind: String,
        metadata: Meta<'a>,
        status: &'a ClusterConsolePolicyStatus,
    }
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta<'a> {
        name: &'a str,
        resource_version: Option<&'a str>,
    }
    let name = policy.name_any();
    let body = StatusOnly {
        api_version: ClusterConsolePolicy::api_version(&()).into_owned(),
        kind: ClusterConsolePolicy::kind(&()).into_owned(),
        metadata: Meta { name: &name, resource_version: policy.metadata.resource_version.as_deref() },
        status,
    };
    let pp = PostParams { field_manager: Some(labels::FIELD_MANAGER.into()), ..Default::default() };
    let body = serde_json::to_vec(&body).map_err(kube::Error::SerdeError)?;
    let request = kube::core::Request::new(ClusterConsolePolicy::url_path(&(), None)).replace_subresource("status", &name, &pp, body).map_err(kube::Error::BuildRequest)?;
    client.request::<serde::de::IgnoredAny>(request).await.map(drop)
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409)
}

/// The policy changed since this resolution, so its status would be stale: not a failure. The
/// newer version comes through the watch with its own reconcile; the requeue covers a watch
/// that is down for a moment.
fn stale_resolution(policy: &ClusterConsolePolicy) -> Action {
    tracing::debug!(policy = %policy.name_any(), "policy changed while resolving; its newer version follows");
    Action::requeue(std::time::Duration::from_secs(1))
}

/// The API server's answers to an object over its size limit: etcd's request limit (1.5 MiB by
/// default, answered 500) or the API server's own limit on a request body (413).
fn is_too_large(e: &kube::core::Status) -> bool {
    e.code == 413 || (e.code == 500 && e.message.contains("request is too large"))
}

/// The status to write when the resolved one does not fit in the object; pure. It keeps the
/// counts and names the problem, and lists no entry: entries of an older resolution left in
/// place would be read as current.
pub fn too_large_status(previous: &ClusterConsolePolicyStatus, full: &ClusterConsolePolicyStatus, bytes: usize, answer: &str) -> ClusterConsolePolicyStatus {
    let (clusters, pools, vms) = (full.clusters.len(), full.pools.len(), full.vms.len());
    let message = format!(
        "the resolved status of {clusters} clusters, {pools} pools and {vms} VMs is {} KiB as JSON and does not fit in the object (the API server answered: {answer}); \
         split the policy into several; the engine API still resolves every VM of this one from its spec",
        bytes.div_ceil(1024)
    );
    let generation = full.observed_generation;
    ClusterConsolePolicyStatus {
        observed_generation: generation,
        conditions: conditions::merge(&previous.conditions, vec![
            conditions::new("Ready", false, "StatusTooLarge", &message, generation),
            conditions::new("Degraded", true, "StatusTooLarge", &message, generation),
        ]),
        default_proxy_url: full.default_proxy_url.clone(),
        clusters: Vec::new(),
        pools: Vec::new(),
        vms: Vec::new(),
        resolved_pools: full.resolved_pools,
        unresolved: full.unresolved,
    }
}

/// The SpiceProxy cache as the resolver's directory.
struct StoreDirectory<'a>(&'a kube::runtime::reflector::Store<DeserializeGuard<SpiceProxy>>);

impl resolve::ProxyDirectory for StoreDirectory<'_> {
    fn lookup(&self, r: &SpiceProxyRef) -> Result<String, String> {
        ready_url_of(self.0.get(&ObjectRef::new(&r.name).within(&r.namespace)).as_deref())
    }

    fn html5_url(&self, r: &SpiceProxyRef) -> Option<String> {
        html5_url_of(self.0.get(&ObjectRef::new(&r.name).within(&r.namespace)).as_deref())
    }
}

/// A referenced SpiceProxy as a resolution sees it, whichever cache it came from: its ready
/// URL, or why there is none (missing, undecodable, not ready).
pub(crate) fn ready_url_of(guard: Option<&DeserializeGuard<SpiceProxy>>) -> Result<String, String> {
    match guard.map(|g| &g.0) {
        None => Err("does not exist".into()),
        Some(Err(invalid)) => Err(format!("cannot be decoded: {}", invalid.error)),
        Some(Ok(spx)) => spx.ready_url().map(str::to_string),
    }
}

pub(crate) fn html5_url_of(guard: Option<&DeserializeGuard<SpiceProxy>>) -> Option<String> {
    guard?.0.as_ref().ok()?.ready_html5_url().map(str::to_string)
}

/// Status from a resolution; pure. Conditions keep their transition time when unchanged.
pub fn build_status(previous: &ClusterConsolePolicyStatus, resolved: Resolved, generation: Option<i64>) -> ClusterConsolePolicyStatus {
    let errors: Vec<String> = resolved
        .errors()
        .map(|e| {
            let place = match (&e.cluster, &e.pool) {
                (Some(c), Some(p)) => format!("VM {} ({c}/{p})", e.name),
                (Some(c), None) if resolved.vms.iter().any(|v| std::ptr::eq(v, e)) => format!("VM {} ({c})", e.name),
                (Some(c), None) => format!("pool {c}/{}", e.name),
                (None, _) => format!("cluster {}", e.name),
            };
            format!("{place}: {}", e.error.as_deref().unwrap_or_default())
        })
        .collect();
    let unresolved = errors.len() as i32;
    let total = resolved.entries().count();
    // Name the first few problems; every entry carries its own error too.
    let mut first_problems = errors.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
    if errors.len() > 5 {
        first_problems.push_str("; ...");
    }
    let ready = if errors.is_empty() {
        conditions::new("Ready", true, "Resolved", format!("{total} entries resolved"), generation)
    } else {
        conditions::new("Ready", false, "UnresolvedEntries", format!("{unresolved} of {total} entries unresolved: {first_problems}"), generation)
    };
    let degraded = conditions::new(
        "Degraded",
        !errors.is_empty(),
        if errors.is_empty() { "AsExpected" } else { "UnresolvedEntries" },
        if errors.is_empty() {
            "every entry resolved".to_string()
        } else {
            format!("{unresolved} entries have no usable proxy, the others are resolved: {first_problems}")
        },
        generation,
    );
    ClusterConsolePolicyStatus {
        observed_generation: generation,
        conditions: conditions::merge(&previous.conditions, vec![ready, degraded]),
        default_proxy_url: resolved.default_proxy_url,
        resolved_pools: resolved.pools.iter().filter(|p| p.error.is_none()).count() as i32,
        unresolved,
        clusters: resolved.clusters,
        pools: resolved.pools,
        vms: resolved.vms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ClusterConsolePolicySpec;

    #[test]
    fn status_names_unresolved_entries_and_keeps_others() {
        let spec: ClusterConsolePolicySpec = serde_yaml::from_str(
            "defaultProxy: {url: g.example}\nclusters:\n- name: c\n  pools:\n  - {name: ok}\n  - {name: bad, proxy: {spiceProxyRef: {name: nope, namespace: ns}}}\n",
        )
        .unwrap();
        let none = |_: &SpiceProxyRef| -> Result<String, String> { Err("does not exist".into()) };
        let st = build_status(&Default::default(), resolve::resolve(&spec, &none), Some(4));
        assert_eq!((st.unresolved, st.resolved_pools, st.observed_generation), (1, 1, Some(4)));
        let ready = &st.conditions[0];
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "UnresolvedEntries"));
        assert!(ready.message.contains("pool c/bad: SpiceProxy ns/nope does not exist"), "{}", ready.message);
        assert!(conditions::is_true(&st.conditions, "Degraded"));
        // Same input again: identical status, so no write and no watch loop.
        let again = build_status(&st, resolve::resolve(&spec, &none), Some(4));
        assert_eq!(again, st);
    }

    #[test]
    fn a_status_too_large_to_store_keeps_counts_names_the_problem_and_lists_nothing() {
        let spec: ClusterConsolePolicySpec = serde_yaml::from_str("defaultProxy: {url: g.example}\nclusters:\n- name: c\n  pools: [{name: a}, {name: b}]\n").unwrap();
        let none = |_: &SpiceProxyRef| -> Result<String, String> { Err("does not exist".into()) };
        let full = build_status(&Default::default(), resolve::resolve(&spec, &none), Some(7));
        let short = too_large_status(&full, &full, 1_600_000, "etcdserver: request is too large");
        assert!(short.pools.is_empty() && short.clusters.is_empty() && short.vms.is_empty());
        assert_eq!((short.resolved_pools, short.unresolved, short.observed_generation), (2, 0, Some(7)));
        assert_eq!(short.default_proxy_url.as_deref(), Some("http://g.example:3128"));
        let ready = short.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "StatusTooLarge"));
        assert!(ready.message.starts_with("the resolved status of 1 clusters, 2 pools and 0 VMs is 1563 KiB as JSON"), "{}", ready.message);
        assert!(ready.message.contains("(the API server answered: etcdserver: request is too large)"), "{}", ready.message);
        assert!(conditions::is_true(&short.conditions, "Degraded"));
        // The same again is the same status: no write, no loop.
        assert_eq!(too_large_status(&short, &full, 1_600_000, "etcdserver: request is too large"), short);

        let e = |code: u16, message: &str| kube::core::Status::failure(message, "").with_code(code);
        assert!(is_too_large(&e(500, "etcdserver: request is too large")));
        assert!(is_too_large(&e(413, "Request entity too large: limit is 3145728")));
        assert!(!is_too_large(&e(500, "etcdserver: leader changed")));
        assert!(!is_too_large(&e(422, "invalid")));
    }
}
