//! Validation and the children a SpiceProxy is run as (pure): ConfigMap, Deployment,
//! Service, PodDisruptionBudget, NetworkPolicy.
use super::*;

/// A Secret of the user's that the proxy pods mount.
#[derive(Debug, PartialEq, Eq)]
pub struct MountedSecret<'a> {
    /// The spec field that names it.
    pub field: &'static str,
    pub secret: &'a str,
    /// Its volume in the pod, and where the proxy reads it (`proxy::config`).
    pub volume: &'static str,
    pub dir: &'static str,
}

/// The Secrets of the user's that the proxy pods mount: built into the pod template, and
/// checked for before anything is applied.
pub fn mounted_secrets(spec: &SpiceProxySpec) -> Vec<MountedSecret<'_>> {
    let html5 = spec.html5.as_ref();
    [
        ("auth.credentialsSecret", spec.auth.credentials_secret.as_deref(), "basic", pc::BASIC_DIR),
        ("html5.tlsSecret", html5.and_then(|h| h.tls_secret.as_deref()), "html5-tls", pc::HTML5_TLS_DIR),
        ("html5.upstreamTls.caSecret", html5.and_then(|h| h.upstream_tls.as_ref()).map(|u| u.ca_secret.as_str()), "hypervisor-ca", pc::UPSTREAM_CA_DIR),
    ]
    .into_iter()
    .filter_map(|(field, secret, volume, dir)| Some(MountedSecret { field, secret: secret?, volume, dir }))
    .collect()
}

/// A DNS-1123 subdomain, what Kubernetes accepts as the name of a Secret.
pub(super) fn is_object_name(name: &str) -> bool {
    let edge_ok = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    name.len() <= 253
        && edge_ok(name.bytes().next())
        && edge_ok(name.bytes().last())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The user's spread constraints, each counting this proxy's pods unless it names others; by
/// default one replica per node where possible, so a node's loss leaves consoles served.
pub(super) fn spread_constraints(spec: &SpiceProxySpec, selector: &BTreeMap<String, String>) -> Vec<TopologySpreadConstraint> {
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
    if !(0..=CLIENT_SEND_BUFFER_MAX).contains(&spec.client_socket.send_buffer_bytes) {
        problems.push(format!("clientSocket.sendBufferBytes {} is outside 0 (the kernel's autotuning) to {CLIENT_SEND_BUFFER_MAX}", spec.client_socket.send_buffer_bytes));
    }
    if let Some(cc) = &spec.client_socket.congestion_control {
        let name_ok = (1..=15).contains(&cc.len()) && cc.starts_with(|c: char| c.is_ascii_lowercase()) && cc.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !name_ok {
            problems.push(format!("clientSocket.congestionControl {cc:?} is not a congestion control name such as cubic or bbr"));
        }
    }
    if let Some(h) = &spec.html5 {
        if spec.auth.mode != AuthMode::Ticket {
            problems.push("html5 needs auth mode Ticket: the token in the browser console URL names the VM".into());
        }
        if h.port == spec.service.port {
            problems.push(format!("html5.port {} is also the proxy's service port", h.port));
        }
        for o in &h.allowed_origins {
            if let Err(why) = crate::proxy::websocket::origin(o) {
                problems.push(format!("html5.allowedOrigins entry {why}"));
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
    pub(super) fn owned_by(mut self, owner: &OwnerReference) -> Self {
        for meta in self.metas_mut() {
            meta.owner_references = Some(vec![owner.clone()]);
        }
        self
    }

    /// Every object's metadata, the NetworkPolicy's if there is one.
    pub(super) fn metas_mut(&mut self) -> impl Iterator<Item = &mut ObjectMeta> {
        let metas = [&mut self.config_map.metadata, &mut self.deployment.metadata, &mut self.service.metadata, &mut self.disruption_budget.metadata];
        metas.into_iter().chain(self.network_policy.as_mut().map(|p| &mut p.metadata))
    }

    /// The same objects, each marked with the digest of the set (`labels::APPLIED_SET`): after a
    /// restart, a set that carries one digest throughout was applied in full.
    pub(super) fn stamped(mut self, digest: &str) -> Self {
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
        limits: spec.limits,
        client_socket: spec.client_socket.clone(),
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

    let config = proxy_config(spec);
    let config_json = serde_json::to_string_pretty(&config)?;
    // The pods roll when the configuration changes, except for the allow-list, the live
    // limits and the allowed origins: running replicas read them again from the mounted
    // ConfigMap, and a rollout would end every open console (after the drain deadline) just to
    // add a hypervisor network, raise a limit or list a portal. (They are blanked to their
    // defaults, so a spec that leaves them so keeps the hash it had before they were live:
    // upgrading the operator rolls no pods.)
    let config_hash = format!("{:x}", Sha256::digest(serde_json::to_vec(&config.read_at_start())?));
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
    for m in mounted_secrets(spec) {
        volumes.push(Volume {
            name: m.volume.into(),
            secret: Some(SecretVolumeSource { secret_name: Some(m.secret.into()), ..Default::default() }),
            ..Default::default()
        });
        mounts.push(VolumeMount { name: m.volume.into(), mount_path: m.dir.into(), read_only: Some(true), ..Default::default() });
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
                    // Covers the proxy's shutdown delay and drain deadline so open tunnels can finish.
                    termination_grace_period_seconds: Some(i64::from(spec.limits.shutdown_delay_seconds) + i64::from(spec.limits.drain_seconds) + 10),
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
pub(super) fn egress_rules(spec: &SpiceProxySpec) -> Vec<NetworkPolicyEgressRule> {
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
pub(super) fn service_value(v: impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(name)) => name,
        other => unreachable!("a unit enum serialises to its name, not {other:?}"),
    }
}
