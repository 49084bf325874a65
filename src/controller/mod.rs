//! The two reconcilers and what they share. Each reconcile is
//! dereference → validate → build → apply → update_status; validate and build are pure.

pub mod policy;
pub mod spice_proxy;

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::PatchParams;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::watch;

use crate::conditions;
use crate::crd::SpiceProxy;
use crate::labels;
use crate::metrics::{ControllerLabel, KindLabel, Metrics};

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
    /// A change refused after its rehearsal was put back; it is tried again after this delay,
    /// not on the watch events the put-back caused (status already says why).
    #[error("a change put back is held for {0:?} before it is tried again")]
    Held(Duration),
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
    /// Publishes Kubernetes Events (and counts repeats of one into a series).
    pub recorder: Recorder,
    /// Per SpiceProxy (by uid), the children last applied in full: an apply of anything else is
    /// rehearsed with a dry run first, and put back if refused part-way (`spice_proxy::apply`).
    pub applied: std::sync::Mutex<std::collections::HashMap<String, spice_proxy::Applied>>,
    /// Consecutive failures per object, for the retry delay.
    pub backoff: Backoff,
}

/// Longest event note the Events API accepts, in bytes.
const EVENT_NOTE_MAX: usize = 1024;

/// Publishes the events a status change is worth (`conditions::transitions`). A refused event is
/// logged and counted, and never fails the reconcile: the status already says everything.
pub(crate) async fn publish_transitions(ctx: &Context, regarding: &ObjectReference, previous: &[Condition], next: &[Condition]) {
    for t in conditions::transitions(previous, next) {
        let mut note = t.note;
        if note.len() > EVENT_NOTE_MAX {
            let mut end = EVENT_NOTE_MAX - '…'.len_utf8();
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push('…');
        }
        let event = Event {
            type_: if t.warning { EventType::Warning } else { EventType::Normal },
            reason: t.reason,
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, regarding).await {
            ctx.metrics.event_failures.inc();
            tracing::warn!(%error, reason = %event.reason, object = ?regarding.name, "could not publish an event");
        }
    }
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
    let proxy_events = without_failures(
        reflector(writer, watcher(Api::<DeserializeGuard<SpiceProxy>>::all(client.clone()), watcher::Config::default())).touched_objects(),
        "SpiceProxy".into(),
        metrics.clone(),
    );

    let (proxies_ready_tx, proxies_ready) = watch::channel(false);
    // The pod name tells replicas' events apart (the chart sets POD_NAME from the downward API).
    let reporter = Reporter { controller: labels::FIELD_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
    let recorder = Recorder::new(client.clone(), reporter);
    metrics.report_proxies(proxies.clone());
    let ctx = Arc::new(Context { client, settings, metrics, proxies: proxies.clone(), proxies_ready, recorder, applied: Default::default(), backoff: Backoff::default() });
    let spx = spice_proxy::controller(ctx.clone(), shutdown.clone());
    let ccp = policy::controller(ctx.clone(), proxy_events, shutdown.clone());
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

/// Resolves once `shutdown` flips to true.
async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// A watch as a controller's trigger. It retries with its own backoff, and a failure is logged
/// and counted by kind on /metrics instead of passed on: kube-runtime backs off all of a
/// controller's triggers together whenever one yields an error, so a watch forbidden by a
/// missing RBAC rule held up every SpiceProxy's reconcile by as much as 30 s.
pub(crate) fn without_failures<T: Send + 'static>(
    watch: impl Stream<Item = Result<T, watcher::Error>> + Send + 'static,
    kind: String,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = T> + Send + 'static {
    watch.default_backoff().filter_map(move |change| {
        let change = change.map_err(|error| {
            tracing::warn!(%kind, %error, "watch failed; retrying with backoff");
            metrics.watch_failures.get_or_create(&KindLabel { kind: kind.clone() }).inc();
        });
        futures::future::ready(change.ok())
    })
}

/// Ends `stream` when `shutdown` flips, and drops it then. A controller whose triggers all end
/// finishes the reconciles in flight and returns. Dropping the reflector's writer matters: a
/// controller whose watch never succeeded waits for its store to fill even after its triggers
/// ended, and only a dropped writer ends that wait. (`Controller::graceful_shutdown_on` stops
/// polling the triggers without dropping them, and so never returned in that case.)
pub(crate) fn dropped_on<S: Stream + Send + 'static>(stream: S, shutdown: watch::Receiver<bool>) -> impl Stream<Item = S::Item> + Send + 'static {
    let mut stream = Some(Box::pin(stream));
    let mut stop = Box::pin(stopped(shutdown));
    futures::stream::poll_fn(move |cx| {
        if stream.is_some() && stop.as_mut().poll(cx).is_ready() {
            stream = None;
        }
        match stream.as_mut() {
            Some(s) => s.as_mut().poll_next(cx),
            None => std::task::Poll::Ready(None),
        }
    })
}

/// A watch as one of a controller's triggers, in the form kube-runtime takes: failures kept
/// out (`without_failures`), and ended and dropped at shutdown (`dropped_on`), after which the
/// controller finishes the reconciles in flight and returns.
pub(crate) fn trigger<T: Send + 'static>(
    watch: impl Stream<Item = Result<T, watcher::Error>> + Send + 'static,
    kind: String,
    metrics: Arc<Metrics>,
    shutdown: &watch::Receiver<bool>,
) -> impl Stream<Item = Result<T, watcher::Error>> + Send + 'static {
    dropped_on(without_failures(watch, kind, metrics), shutdown.clone()).map(Ok)
}

/// Parameters of the operator's status merge patches: its one field manager, so
/// `managedFields` say who wrote a status.
pub(crate) fn status_patch_params() -> PatchParams {
    PatchParams { field_manager: Some(labels::FIELD_MANAGER.into()), ..Default::default() }
}

/// When to retry an object whose reconcile failed: 5 s after its first failure, doubling with
/// each further one up to 5 minutes, and back to 5 s once it succeeds. A refusal that lasts (a
/// quota, a node port held elsewhere) would otherwise cost its rehearsal's API requests every
/// 5 s for as long as it lasts; a change to the object is reconciled at once whatever the delay.
/// A conflict (409: the object changed meanwhile) is retried after a second and not counted.
/// A failing watch backs off on its own, in `without_failures`.
#[derive(Default)]
pub struct Backoff {
    failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

pub(crate) const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Objects deleted while failing leave an entry behind; past this many the table starts over.
const BACKOFF_ENTRIES_MAX: usize = 10_000;

impl Backoff {
    /// Counts a failure of the object `key` and says when to retry it.
    pub fn failed(&self, key: &str, error: &Error) -> Duration {
        if matches!(error, Error::Kube(kube::Error::Api(s)) if s.code == 409) {
            return Duration::from_secs(1);
        }
        if let Error::Held(remaining) = error {
            return *remaining;
        }
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= BACKOFF_ENTRIES_MAX && !failures.contains_key(key) {
            failures.clear();
        }
        let count = failures.entry(key.to_string()).or_insert(0);
        *count = count.saturating_add(1);
        retry_delay(*count)
    }

    /// The object reconciled: its next failure is a first one again.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

/// The delay after `failures` consecutive failures (at least one).
fn retry_delay(failures: u32) -> Duration {
    RETRY_FIRST.saturating_mul(1u32.checked_shl(failures.saturating_sub(1)).unwrap_or(u32::MAX)).min(RETRY_MAX)
}

/// Both controllers' error policy: retry after the backoff, counting and logging the failure.
/// A change held after its put-back is no new failure (the refusal before it was counted and
/// logged): it only waits, so it is logged at debug level and not counted.
pub(crate) fn retry_after_failure<K>(obj: &DeserializeGuard<K>, error: &Error, ctx: &Context, label: &ControllerLabel) -> Action
where
    K: Resource<DynamicType = ()>,
{
    let (namespace, name) = match &obj.0 {
        Ok(o) => (o.meta().namespace.clone().unwrap_or_default(), o.meta().name.clone().unwrap_or_default()),
        Err(invalid) => (invalid.metadata.namespace.clone().unwrap_or_default(), invalid.metadata.name.clone().unwrap_or_default()),
    };
    let retry = ctx.backoff.failed(&backoff_key(obj), error);
    if let Error::Held(_) = error {
        tracing::debug!(controller = label.controller, namespace, name, retry_in_seconds = retry.as_secs_f64(), "change held after its put-back");
    } else {
        ctx.metrics.failures.get_or_create(label).inc();
        tracing::warn!(controller = label.controller, namespace, name, %error, retry_in_seconds = retry.as_secs(), "reconcile failed");
    }
    Action::requeue(retry)
}

/// The key an object's failures are counted under: its uid, which a recreated object does not
/// share; its name when even that is missing.
pub(crate) fn backoff_key<K: Resource>(obj: &K) -> String {
    let meta = obj.meta();
    meta.uid.clone().unwrap_or_else(|| format!("{}/{}", meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Context whose client answers every request with an empty 200 (nothing here calls it).
    fn offline_context() -> Context {
        let answer = tower::service_fn(|_: http::Request<kube::client::Body>| async { Ok::<_, std::convert::Infallible>(http::Response::new(kube::client::Body::empty())) });
        let client = Client::new(answer, "default");
        let (proxies, _) = reflector::store();
        let (_, proxies_ready) = watch::channel(true);
        let recorder = Recorder::new(client.clone(), Reporter { controller: "test".into(), instance: None });
        let settings = Settings { proxy_image: "i".into() };
        Context { client, settings, metrics: Arc::default(), proxies, proxies_ready, recorder, applied: Default::default(), backoff: Backoff::default() }
    }

    #[tokio::test]
    async fn a_held_change_waits_without_counting_as_a_failure() {
        let ctx = offline_context();
        let label = ControllerLabel { controller: "spiceproxy" };
        let spx: SpiceProxy = serde_yaml::from_str("apiVersion: console.spice-operator.io/v1alpha1\nkind: SpiceProxy\nmetadata: {name: edge, namespace: ns, uid: u1}\nspec: {allowedTargets: []}\n").unwrap();
        let obj = DeserializeGuard(Ok(spx));
        let failures = || ctx.metrics.failures.get_or_create(&label).get();
        assert_eq!(retry_after_failure(&obj, &Error::Held(Duration::from_secs(3)), &ctx, &label), Action::requeue(Duration::from_secs(3)));
        assert_eq!(failures(), 0, "a held change is no failure");
        assert_eq!(retry_after_failure(&obj, &Error::MissingField("metadata.uid"), &ctx, &label), Action::requeue(RETRY_FIRST));
        assert_eq!(failures(), 1);
        assert_eq!(retry_after_failure(&obj, &Error::Held(Duration::from_secs(2)), &ctx, &label), Action::requeue(Duration::from_secs(2)));
        assert_eq!(retry_after_failure(&obj, &Error::MissingField("metadata.uid"), &ctx, &label), Action::requeue(2 * RETRY_FIRST), "the hold did not count towards the backoff");
        assert_eq!(failures(), 2);
    }

    #[test]
    fn retries_back_off_per_object_and_start_over_after_a_success() {
        let backoff = Backoff::default();
        let refused = Error::Kube(kube::Error::Api(kube::core::Status { code: 403, ..Default::default() }.boxed()));
        let conflict = Error::Kube(kube::Error::Api(kube::core::Status { code: 409, ..Default::default() }.boxed()));
        let delays: Vec<u64> = (0..9).map(|_| backoff.failed("a", &refused).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff.failed("b", &refused).as_secs(), 5, "each object counts its own failures");
        assert_eq!(backoff.failed("a", &conflict).as_secs(), 1, "a conflict is retried at once");
        assert_eq!(backoff.failed("a", &refused).as_secs(), 300, "and does not reset the count");
        assert_eq!(backoff.failed("b", &Error::Held(Duration::from_secs(3))).as_secs(), 3, "a held change waits out its hold");
        assert_eq!(backoff.failed("b", &refused).as_secs(), 10, "and is not counted");
        backoff.succeeded("a");
        assert_eq!(backoff.failed("a", &refused).as_secs(), 5);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX, "no overflow however long it fails");
    }

    /// Notes its drop, as a reflector's writer would be dropped with its stream.
    struct DropFlag(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_trigger_that_never_yields_ends_and_is_dropped_at_shutdown() {
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = DropFlag(dropped.clone());
        // A watch that never lists successfully: pending for ever, holding its writer.
        let never = futures::stream::pending::<u32>().map(move |x| {
            let _ = &flag;
            x
        });
        let (tx, rx) = watch::channel(false);
        let mut trigger = Box::pin(dropped_on(never, rx));
        assert!(futures::poll!(trigger.next()).is_pending());
        assert!(!dropped.load(std::sync::atomic::Ordering::SeqCst));
        tx.send(true).unwrap();
        let end = tokio::time::timeout(Duration::from_secs(1), trigger.next()).await.expect("the trigger ends at shutdown");
        assert_eq!(end, None);
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst), "the stream (and its writer) is dropped, not just no longer polled");
    }

    #[tokio::test]
    async fn watch_failures_are_counted_by_kind_and_not_passed_on() {
        let metrics = Arc::new(Metrics::default());
        let items = vec![Ok(1), Err(watcher::Error::NoResourceVersion), Ok(2)];
        let passed: Vec<u32> = without_failures(futures::stream::iter(items), "ConfigMap".into(), metrics.clone()).collect().await;
        assert_eq!(passed, [1, 2]);
        assert!(metrics.encode().contains("spice_operator_watch_failures_total{kind=\"ConfigMap\"} 1\n"), "{}", metrics.encode());
    }
}
