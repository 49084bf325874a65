//! The configuration file a proxy replica reads: rendered by the operator into a ConfigMap
//! from a SpiceProxy spec, so the proxy needs no access to the Kubernetes API.

use serde::{Deserialize, Serialize};

use super::tunnel::DataPath;
use crate::crd::{AuthMode, ClientSocketSpec, ProxyLimits};

pub const CONFIG_DIR: &str = "/etc/spice-proxy/config";
pub const CONFIG_FILE: &str = "config.json";
pub const KEYS_DIR: &str = "/etc/spice-proxy/keys";
pub const BASIC_DIR: &str = "/etc/spice-proxy/basic";
/// Port the proxy listens on inside the pod; the Service maps its own port to it.
pub const LISTEN_PORT: u16 = 3128;
pub const ADMIN_PORT: u16 = 9090;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    pub listen: String,
    pub admin_listen: String,
    pub allowed_targets: Vec<AllowedTarget>,
    pub auth_mode: AuthMode,
    /// Directory with the ticket signing keys (`current`, optional `previous`).
    pub keys_dir: Option<String>,
    /// Directory with `username` and `password` (mode Basic).
    pub basic_dir: Option<String>,
    pub limits: ProxyLimits,
    /// Send buffer and congestion control of the sockets toward clients.
    #[serde(default)]
    pub client_socket: ClientSocketSpec,
    #[serde(default)]
    pub data_path: DataPath,
    /// The browser path (spice-html5 pages + WebSocket bridge); absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html5: Option<Html5Config>,
    /// Threads that accept and carry CONNECT tunnels; absent: one per CPU the process may use
    /// (cgroup CPU limits included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Accept the PROXY protocol from these load balancers (and only connections from them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<super::proxy_protocol::ProxyProtocolConfig>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Html5Config {
    pub listen: String,
    /// Where the spice-html5 client files are (the image ships Debian's package there).
    #[serde(default = "default_html5_dir")]
    pub static_dir: String,
    /// Origins, besides the console page's own, whose pages may open the WebSocket.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Serve https:// and wss:// with this certificate; absent: plain http:// and ws://.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// Connect to the hypervisor's SPICE tls-port (the ticket's last port) with TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_tls: Option<UpstreamTls>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamTls {
    /// PEM of the CA that signed the hypervisors' SPICE certificates.
    pub ca_file: String,
    /// Match the certificate's subject instead of its name, as spice-gtk's host-subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_subject: Option<String>,
}

/// Where the operator mounts the hypervisor CA (a Secret with `ca.crt`).
pub const UPSTREAM_CA_DIR: &str = "/etc/spice-proxy/hypervisor-ca";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsFiles {
    pub cert_file: String,
    pub key_file: String,
}

/// Where the operator mounts a SpiceProxy's browser-side certificate (a kubernetes.io/tls Secret).
pub const HTML5_TLS_DIR: &str = "/etc/spice-proxy/html5-tls";

pub const HTML5_DIR: &str = "/usr/share/spice-html5";
pub const HTML5_PORT: u16 = 6082;

fn default_html5_dir() -> String {
    HTML5_DIR.into()
}

impl ProxyConfig {
    /// This configuration without what a running replica takes from a changed file (the
    /// allow-list, the live limits, the browser port's allowed origins and the load balancers
    /// trusted to send the PROXY protocol, blanked to their defaults): a change to what is left
    /// needs a restart, which the operator rolls the pods for.
    pub fn read_at_start(&self) -> ProxyConfig {
        ProxyConfig {
            allowed_targets: Vec::new(),
            limits: self.limits.with_live_settings_of(&ProxyLimits::default()),
            html5: self.html5.clone().map(|h| Html5Config { allowed_origins: Vec::new(), ..h }),
            proxy_protocol: self.proxy_protocol.as_ref().map(|_| Default::default()),
            ..self.clone()
        }
    }

    /// The origins besides its own whose pages may open the browser port's WebSocket.
    pub fn allowed_origins(&self) -> &[String] {
        self.html5.as_ref().map_or(&[], |h| &h.allowed_origins)
    }
}

/// One allow-list entry: CIDR and inclusive port ranges.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AllowedTarget {
    pub cidr: ipnet::IpNet,
    pub ports: Vec<(u16, u16)>,
}
