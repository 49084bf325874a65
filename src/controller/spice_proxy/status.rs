//! The status, built only from what was applied and read back (pure): the URL clients use,
//! the conditions, and what to say when nothing could be applied.
use super::*;

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

pub(super) fn invalid_status(spx: &SpiceProxy, why: &str) -> SpiceProxyStatus {
    not_applied_status(spx, "InvalidSpec", why, "nothing applied until the spec is fixed")
}

/// How often a SpiceProxy whose Secret is missing looks for it again.
pub(super) const SECRET_RECHECK: Duration = Duration::from_secs(10);

/// The mounted Secrets that do not exist, each as a sentence. Metadata reads: the operator
/// never reads the data of a Secret it did not create.
pub(super) async fn missing_secrets(client: &kube::Client, ns: &str, spec: &SpiceProxySpec) -> Result<Vec<String>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mounted = mounted_secrets(spec);
    let found = futures::future::try_join_all(mounted.iter().map(|m| secrets.get_metadata_opt(m.secret))).await?;
    Ok(mounted.iter().zip(found).filter(|(_, found)| found.is_none()).map(|(m, _)| format!("{}: Secret {ns}/{} does not exist", m.field, m.secret)).collect())
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
pub(super) fn not_applied_status(spx: &SpiceProxy, reason: &str, why: &str, progressing: &str) -> SpiceProxyStatus {
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
