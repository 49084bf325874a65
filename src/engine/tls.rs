//! The engine API's certificate: from a mounted Secret (`tls.crt`, `tls.key`), read again as it
//! is renewed, or generated once, stored in a Secret every replica loads, and its certificate
//! published in a ConfigMap (`ca.crt`) so engines can pin it. The proxy's browser-side
//! certificate is served from its mounted Secret the same way (`CertFiles`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::labels;

#[derive(Clone, Debug)]
pub enum CertSource {
    /// A directory holding `tls.crt` and `tls.key` (a mounted kubernetes.io/tls Secret).
    Files(PathBuf),
    /// Generate once into Secret `secret` of `namespace`; publish `ca.crt` in ConfigMap `ca_config_map`.
    Generated { namespace: String, secret: String, ca_config_map: String, dns_names: Vec<String> },
}

/// The generated certificate's chain and key PEM (`CertSource::Generated`): created on first
/// use, then the same for every replica and every start.
pub async fn generated(client: &Client, namespace: &str, secret: &str, ca_config_map: &str, dns_names: &[String]) -> anyhow::Result<(String, String)> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let stored = match secrets.get_opt(secret).await? {
        Some(s) => s,
        None => {
            let mut names = dns_names.to_vec();
            names.extend(["localhost".to_string(), "127.0.0.1".to_string()]);
            let key = rcgen::KeyPair::generate()?;
            let mut params = rcgen::CertificateParams::new(names)?;
            params.distinguished_name.push(rcgen::DnType::CommonName, "spice-operator engine API");
            params.not_after = rcgen::date_time_ymd(2036, 1, 1);
            let cert = params.self_signed(&key)?;
            let new = Secret {
                metadata: ObjectMeta {
                    name: Some(secret.to_string()),
                    labels: Some(BTreeMap::from([(labels::MANAGED_BY.into(), labels::FIELD_MANAGER.into())])),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                string_data: Some(BTreeMap::from([("tls.crt".into(), cert.pem()), ("tls.key".into(), key.serialize_pem())])),
                ..Default::default()
            };
            match secrets.create(&PostParams::default(), &new).await {
                Ok(s) => s,
                // Another replica generated it first: use that one.
                Err(kube::Error::Api(e)) if e.code == 409 => secrets.get(secret).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let data = stored.data.unwrap_or_default();
    let field = |k: &str| {
        data.get(k).map(|b| String::from_utf8_lossy(&b.0).into_owned()).with_context(|| format!("Secret {namespace}/{secret} has no {k}"))
    };
    let (cert, key) = (field("tls.crt")?, field("tls.key")?);
    let cm = ConfigMap {
        metadata: ObjectMeta { name: Some(ca_config_map.to_string()), ..Default::default() },
        data: Some(BTreeMap::from([("ca.crt".into(), cert.clone())])),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(ca_config_map, &PatchParams::apply(labels::FIELD_MANAGER).force(), &Patch::Apply(&cm))
        .await
        .with_context(|| format!("cannot publish the engine API certificate in ConfigMap {namespace}/{ca_config_map}"))?;
    Ok((cert, key))
}

pub fn server_config(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().context("bad certificate PEM")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("bad private key PEM")?;
    Ok(with_alpn(server_config_builder()?.with_single_cert(certs, key)?))
}

fn server_config_builder() -> anyhow::Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::server::WantsServerCert>> {
    Ok(rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth())
}

/// Both servers speak HTTP/1.1 only (axum without its http2 feature).
fn with_alpn(mut config: rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// How often mounted certificate files are read again. The kubelet takes up to a minute or so
/// to update a Secret volume; this adds little to that.
pub const RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// A certificate served from files in a mounted kubernetes.io/tls Secret, read again every
/// `RELOAD_EVERY`: cert-manager renews such Secrets (every 60 days by default), and a server
/// that read them once would serve the old certificate until it expired. New handshakes get
/// the new certificate; open connections keep theirs.
#[derive(Debug)]
pub struct CertFiles {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: std::sync::RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    /// What the files held, to tell a change from a re-read.
    pem: (String, String),
    key: Arc<rustls::sign::CertifiedKey>,
    /// The certificate's notAfter, in seconds since the epoch.
    not_after: i64,
}

impl CertFiles {
    /// Reads both files; an unreadable, malformed or mismatched pair is an error (at start a
    /// server must fail loudly, not serve nothing).
    pub fn load(cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> anyhow::Result<Arc<CertFiles>> {
        let (cert_file, key_file) = (cert_file.into(), key_file.into());
        let loaded = read_pair(&cert_file, &key_file)?;
        Ok(Arc::new(CertFiles { cert_file, key_file, current: std::sync::RwLock::new(loaded) }))
    }

    /// Reads the files again: true when they changed and the new pair is served from now on; an
    /// error (a half-written update, a key that does not match) keeps the previous pair.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let (cert, key) = (read_file(&self.cert_file)?, read_file(&self.key_file)?);
        let unchanged = {
            let current = self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            current.pem.0 == cert && current.pem.1 == key
        };
        if unchanged {
            return Ok(false);
        }
        let loaded = parse_pair(cert, key)?;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = loaded;
        Ok(true)
    }

    /// The served certificate's notAfter, in seconds since the epoch.
    pub fn not_after(&self) -> i64 {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).not_after
    }

    /// A server configuration that serves whatever pair was read last.
    pub fn server_config(self: &Arc<Self>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        Ok(with_alpn(server_config_builder()?.with_cert_resolver(self.clone())))
    }

    /// Reloads every `RELOAD_EVERY`, for as long as the server runs; `on_change` gets the new
    /// notAfter (for an expiry gauge).
    pub async fn keep_reloading(self: Arc<Self>, what: &'static str, on_change: impl Fn(i64) + Send + 'static) {
        loop {
            tokio::time::sleep(RELOAD_EVERY).await;
            match self.reload() {
                Ok(true) => {
                    tracing::info!(certificate = %self.cert_file.display(), not_after = self.not_after(), "{what}: serving the renewed certificate");
                    on_change(self.not_after());
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(certificate = %self.cert_file.display(), error = %format!("{e:#}"), "{what}: keeping the certificate served so far"),
            }
        }
    }
}

impl rustls::server::ResolvesServerCert for CertFiles {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).key.clone())
    }
}

fn read_file(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn read_pair(cert_file: &std::path::Path, key_file: &std::path::Path) -> anyhow::Result<Loaded> {
    parse_pair(read_file(cert_file)?, read_file(key_file)?).with_context(|| format!("{} and {}", cert_file.display(), key_file.display()))
}

/// The notAfter of the first certificate in `cert_pem`, in seconds since the epoch.
pub fn not_after(cert_pem: &str) -> anyhow::Result<i64> {
    let first = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).next().context("no certificate in the certificate file")?.context("bad certificate PEM")?;
    first_not_after(&[first])
}

fn first_not_after(chain: &[CertificateDer<'_>]) -> anyhow::Result<i64> {
    let first = chain.first().context("no certificate in the certificate file")?;
    let (_, parsed) = x509_parser::parse_x509_certificate(first.as_ref()).map_err(|e| anyhow::anyhow!("bad certificate: {e}"))?;
    Ok(parsed.validity().not_after.timestamp())
}

fn parse_pair(cert_pem: String, key_pem: String) -> anyhow::Result<Loaded> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().context("bad certificate PEM")?;
    let not_after = first_not_after(&certs)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("bad private key PEM")?;
    let key = rustls::sign::CertifiedKey::from_der(certs, key, &rustls::crypto::aws_lc_rs::default_provider()).context("the key does not fit the certificate")?;
    Ok(Loaded { pem: (cert_pem, key_pem), key: Arc::new(key), not_after })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Engines get hybrid post-quantum key exchange (X25519 with ML-KEM-768, as Go 1.24+ and
    /// current browsers offer): traffic recorded today (console tickets) stays out of reach of
    /// a future quantum computer.
    #[test]
    fn the_engine_api_negotiates_post_quantum_key_exchange_over_tls_1_3() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
        let server_config = server_config(&cert.pem(), &key.serialize_pem()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        // A client that offers what a current Go or browser client offers: the provider's defaults.
        let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut client = rustls::ClientConnection::new(Arc::new(client_config), "localhost".try_into().unwrap()).unwrap();
        let mut server = rustls::ServerConnection::new(server_config).unwrap();
        // Bytes shuttled in memory until both sides finish the handshake (a few flights).
        for _ in 0..10 {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        assert!(!server.is_handshaking(), "the handshake finished");
        assert_eq!(server.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(server.negotiated_key_exchange_group().map(|g| g.name()), Some(rustls::NamedGroup::X25519MLKEM768));
    }

    fn cert(year: i32) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    fn served(files: &CertFiles) -> Vec<u8> {
        files.current.read().unwrap().key.end_entity_cert().unwrap().to_vec()
    }

    /// A renewal is served once both files hold it; a half-written or mismatched pair is refused
    /// and the previous one kept, so a bad renewal never leaves the server without a certificate.
    #[test]
    fn renewals_are_picked_up_and_bad_ones_keep_the_previous_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let write = |(cert, key): &(String, String)| {
            std::fs::write(&cert_file, cert).unwrap();
            std::fs::write(&key_file, key).unwrap();
        };
        let (old, renewed) = (cert(2030), cert(2031));
        write(&old);
        let files = CertFiles::load(&cert_file, &key_file).unwrap();
        assert_eq!(files.not_after(), 1_893_456_000);
        assert!(!files.reload().unwrap(), "unchanged files are no renewal");
        let old_der = served(&files);

        // The renewed certificate with the old key (the kubelet mid-update, or a wrong Secret).
        std::fs::write(&cert_file, &renewed.0).unwrap();
        let e = files.reload().unwrap_err();
        assert!(format!("{e:#}").contains("the key does not fit the certificate"), "{e:#}");
        assert_eq!(served(&files), old_der);
        // A truncated certificate file.
        std::fs::write(&cert_file, &renewed.0[..renewed.0.len() / 2]).unwrap();
        assert!(files.reload().is_err());
        assert_eq!((served(&files), files.not_after()), (old_der.clone(), 1_893_456_000));

        write(&renewed);
        assert!(files.reload().unwrap());
        assert_ne!(served(&files), old_der);
        assert_eq!(files.not_after(), 1_924_992_000);
        // At start nothing is served yet: a bad pair is an error, not a server without a certificate.
        std::fs::write(&key_file, &old.1).unwrap();
        let e = CertFiles::load(&cert_file, &key_file).unwrap_err();
        assert!(format!("{e:#}").contains("tls.crt and") && format!("{e:#}").contains("the key does not fit"), "{e:#}");
    }
}
