use super::*;
use crate::crd::{ExternalAddress, PortRange, ProxyLimits, TargetRule};
use crate::proxy::config::ProxyConfig;
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
    // The default shutdown delay (5 s) and drain (60 s), and 10 s to spare.
    assert_eq!(pod.termination_grace_period_seconds, Some(75));
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
fn a_config_change_rolls_the_pods_unless_only_the_allow_list_live_limits_origins_or_balancers_changed() {
    let a = spx(BASIC);
    let hash = |s: &SpiceProxy| build(s, "i").unwrap().deployment.spec.template.metadata.unwrap().annotations.unwrap()[labels::CONFIG_HASH].clone();
    let config = |s: &SpiceProxy| build(s, "i").unwrap().config_map.data.unwrap()["config.json"].clone();
    assert_eq!(hash(&a), hash(&a.clone()));
    // A new hypervisor network: in the ConfigMap, which running replicas read again, and
    // not in the pod template, so no open console is ended by a rollout.
    let mut wider = a.clone();
    wider.spec.allowed_targets.push(TargetRule { cidr: "10.9.0.0/24".into(), ports: vec![PortRange { from: 5900, to: None }] });
    assert_ne!(config(&a), config(&wider));
    assert_eq!(hash(&a), hash(&wider), "an allow-list change must not roll the pods");
    // The same for each limit the replicas read again.
    let live: [fn(&mut ProxyLimits); 7] = [
        |l| l.max_tunnels += 1,
        |l| l.max_tunnels_per_client += 1,
        |l| l.idle_timeout_seconds += 60,
        |l| l.half_closed_timeout_seconds += 1,
        |l| l.connect_timeout_seconds += 1,
        |l| l.max_auth_failures_per_client += 1,
        |l| l.auth_failure_window_seconds += 1,
    ];
    for (i, change) in live.iter().enumerate() {
        let mut raised = a.clone();
        change(&mut raised.spec.limits);
        assert_ne!(config(&a), config(&raised), "live limit {i} reaches the ConfigMap");
        assert_eq!(hash(&a), hash(&raised), "live limit {i} must not roll the pods");
    }
    // And for the browser port's allowed origins; turning the browser port on rolls them.
    let portal = spx(&format!("{BASIC}  html5: {{allowedOrigins: [\"https://portal.example.com\"]}}\n"));
    let mut two_portals = portal.clone();
    two_portals.spec.html5.as_mut().unwrap().allowed_origins.push("https://engine.example.com".into());
    assert_ne!(config(&portal), config(&two_portals));
    assert_eq!(hash(&portal), hash(&two_portals), "an allowed origin must not roll the pods");
    assert_ne!(hash(&a), hash(&portal), "the browser port is read at start");
    // And for the load balancers trusted to send the PROXY protocol; turning it on rolls them.
    let balanced = spx(&format!("{BASIC}  service: {{proxyProtocol: {{trustedCidrs: [\"10.0.0.0/24\"]}}}}\n"));
    let mut moved = balanced.clone();
    moved.spec.service.proxy_protocol.as_mut().unwrap().trusted_cidrs.push("10.0.1.0/24".into());
    assert_ne!(config(&balanced), config(&moved));
    assert_eq!(hash(&balanced), hash(&moved), "a new load balancer address must not roll the pods");
    assert_ne!(hash(&a), hash(&balanced), "the PROXY protocol's use is read at start");
    // Anything else the replicas read only at start rolls them.
    let read_at_start: [fn(&mut ProxyLimits); 4] = [|l| l.dead_peer_timeout_seconds += 1, |l| l.handshake_timeout_seconds += 1, |l| l.drain_seconds += 1, |l| l.shutdown_delay_seconds += 1];
    for (i, change) in read_at_start.iter().enumerate() {
        let mut changed = a.clone();
        change(&mut changed.spec.limits);
        assert_ne!(hash(&a), hash(&changed), "limit {i} read at start must roll the pods");
    }
    // With default limits the hash is what it was before limits applied live (the
    // configuration without its allow-list), so upgrading the operator rolls no pods.
    let cfg = proxy_config(&a.spec);
    let before = format!("{:x}", sha2::Sha256::digest(serde_json::to_vec(&ProxyConfig { allowed_targets: Vec::new(), ..cfg }).unwrap()));
    assert_eq!(hash(&a), before);
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
    let mut s = spx(BASIC);
    s.spec.client_socket.send_buffer_bytes = 16 * 1024 * 1024 + 1;
    s.spec.client_socket.congestion_control = Some("Cubic; rm".into());
    assert_eq!(validate(&s.spec).unwrap_err(), [
        "clientSocket.sendBufferBytes 16777217 is outside 0 (the kernel's autotuning) to 16777216",
        "clientSocket.congestionControl \"Cubic; rm\" is not a congestion control name such as cubic or bbr",
    ]);
    s.spec.client_socket.send_buffer_bytes = -1;
    s.spec.client_socket.congestion_control = Some("a_name_of_16_ch".to_string() + "x");
    assert_eq!(validate(&s.spec).unwrap_err().len(), 2);
    s.spec.client_socket.send_buffer_bytes = 0;
    s.spec.client_socket.congestion_control = Some("cubic".into());
    assert!(validate(&s.spec).is_ok(), "0: the kernel's autotuning; cubic is a name");
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
        mounted_secrets(&s.spec).iter().map(|m| (m.field, m.secret)).collect::<Vec<_>>(),
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
    // An origin also goes into the pages' Content-Security-Policy: nothing that adds to it.
    s.spec.html5.as_mut().unwrap().allowed_origins = vec!["https://portal.example.com; script-src *".into()];
    let problems = validate(&s.spec).unwrap_err();
    assert!(problems.iter().any(|p| p.contains("allowedOrigins entry \"https://portal.example.com; script-src *\" is not an origin")), "{problems:?}");
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
