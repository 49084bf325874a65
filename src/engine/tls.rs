//! The engine API's certificate: from a mounted Secret (`tls.crt`, `tls.key`), or generated
//! once, stored in a Secret every replica loads, and its certificate published in a ConfigMap
//! (`ca.crt`) so engines can pin it.

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

/// Certificate chain and key PEM.
pub async fn load(client: &Client, source: &CertSource) -> anyhow::Result<(String, String)> {
    match source {
        CertSource::Files(dir) => {
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).with_context(|| format!("cannot read {}", dir.join(f).display()));
            Ok((read("tls.crt")?, read("tls.key")?))
        }
        CertSource::Generated { namespace, secret, ca_config_map, dns_names } => {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
            let stored = match secrets.get_opt(secret).await? {
                Some(s) => s,
                None => {
                    let mut names = dns_names.clone();
                    names.extend(["localhost".to_string(), "127.0.0.1".to_string()]);
                    let key = rcgen::KeyPair::generate()?;
                    let mut params = rcgen::CertificateParams::new(names)?;
                    params.distinguished_name.push(rcgen::DnType::CommonName, "spice-operator engine API");
                    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
                    let cert = params.self_signed(&key)?;
                    let new = Secret {
                        metadata: ObjectMeta {
                            name: Some(secret.clone()),
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
                metadata: ObjectMeta { name: Some(ca_config_map.clone()), ..Default::default() },
                data: Some(BTreeMap::from([("ca.crt".into(), cert.clone())])),
                ..Default::default()
            };
            Api::<ConfigMap>::namespaced(client.clone(), namespace)
                .patch(ca_config_map, &PatchParams::apply(labels::FIELD_MANAGER).force(), &Patch::Apply(&cm))
                .await
                .with_context(|| format!("cannot publish the engine API certificate in ConfigMap {namespace}/{ca_config_map}"))?;
            Ok((cert, key))
        }
    }
}

pub fn server_config(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().context("bad certificate PEM")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("bad private key PEM")?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Engines get hybrid post-quantum key exchange (X25519 with ML-KEM-768, as Go 1.24+ and
    /// current browsers offer), so recorded traffic (console tickets) cannot be decrypted later.
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
}
