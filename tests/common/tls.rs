//! Certificates for TLS tests, and a client that reports which one a server serves.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// A certificate for `localhost` that expires on 1 January of `year`.
pub fn localhost_cert(year: i32) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_after = rcgen::date_time_ymd(year, 1, 1);
    (params.self_signed(&key).unwrap(), key)
}

/// A TLS client that trusts `certs` (self-signed) and nothing else.
pub fn trusting(certs: &[&rcgen::Certificate]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    certs.iter().for_each(|c| roots.add(c.der().clone()).unwrap());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A verified TLS connection to `addr` as `localhost`.
pub async fn connect(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config.clone()).connect("localhost".try_into().unwrap(), tcp).await
}

/// The certificate a connection's server presented.
pub fn served(tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> rustls::pki_types::CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().expect("a server certificate")[0].clone().into_owned()
}

/// What the kubelet does when a mounted kubernetes.io/tls Secret changes: the new files replace
/// the old ones whole, never written in place.
pub fn renew_in_place(dir: &Path, cert: &rcgen::Certificate, key: &rcgen::KeyPair) {
    for (name, text) in [("tls.key", key.serialize_pem()), ("tls.crt", cert.pem())] {
        let next = dir.join(format!("{name}.next"));
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, dir.join(name)).unwrap();
    }
}
