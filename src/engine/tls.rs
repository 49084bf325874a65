//! The engine API's certificate: from a mounted Secret (`tls.crt`, `tls.key`), read again as it
//! is renewed (`crate::tls::CertFiles`), or generated once, stored in a Secret every replica
//! loads, and its certificate published in a ConfigMap (`ca.crt`) so engines can pin it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

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
