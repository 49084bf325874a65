//! TLS material read from mounted Secrets, and read again as it is renewed: the certificates the
//! proxy's browser side and the operator's engine API serve, and the CA the browser bridge
//! checks hypervisors against. cert-manager renews Secrets in place (every 60 days by default)
//! and the kubelet updates the mounted files; a process that read them once would serve an
//! expired certificate, or refuse a hypervisor whose CA was rotated, until it restarted.

use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The one crypto provider: aws-lc-rs, whose defaults offer X25519MLKEM768 first.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

type Parse<T> = Box<dyn Fn(&[String]) -> anyhow::Result<T> + Send + Sync>;

/// What a set of files parses into, read again as they change. Users of the value take the
/// current one per connection: new connections get a renewal, open ones keep theirs. A change
/// that does not parse (a half-written update, a key that does not fit) is logged and the
/// previous value kept, so a bad renewal never leaves a server without a certificate.
pub struct Reloading<T> {
    files: Vec<PathBuf>,
    parse: Parse<T>,
    current: RwLock<Current<T>>,
}

struct Current<T> {
    /// What the files held, to tell a change from a re-read.
    texts: Vec<String>,
    value: Arc<T>,
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Reads and parses the files; any failure is an error naming them (at start a server must
    /// fail loudly, not run without what it was configured with).
    pub fn load(files: Vec<PathBuf>, parse: impl Fn(&[String]) -> anyhow::Result<T> + Send + Sync + 'static) -> anyhow::Result<Arc<Self>> {
        let texts = read_all(&files)?;
        let value = parse(&texts).with_context(|| names(&files))?;
        Ok(Arc::new(Reloading { files, parse: Box::new(parse), current: RwLock::new(Current { texts, value: Arc::new(value) }) }))
    }

    /// The value read last.
    pub fn current(&self) -> Arc<T> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).value.clone()
    }

    /// Reads the files again: true when they changed and the new value is used from now on; an
    /// error keeps the previous value.
    pub fn reload(&self) -> anyhow::Result<bool> {
        self.use_texts(&read_all(&self.files)?)
    }

    fn use_texts(&self, texts: &[String]) -> anyhow::Result<bool> {
        if self.current.read().unwrap_or_else(PoisonError::into_inner).texts == texts {
            return Ok(false);
        }
        let value = (self.parse)(texts).with_context(|| names(&self.files))?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Current { texts: texts.to_vec(), value: Arc::new(value) };
        Ok(true)
    }

    /// Gives `on_change` the value read so far (for an expiry gauge, say), then spawns a task
    /// that reloads the files as they change (`crate::mounted::follow`) and gives it each new
    /// value; abort the task to stop.
    pub fn keep_reloading(self: &Arc<Self>, what: &'static str, on_change: impl Fn(&T) + Send + 'static) -> tokio::task::JoinHandle<()> {
        on_change(&self.current());
        let this = self.clone();
        tokio::spawn(async move {
            let files = this.files.clone();
            let read = move || read_all(&files);
            // Moved in: a borrow held across the loop's awaits would need `on_change: Sync`.
            let apply = move |texts: &Vec<String>| {
                if this.use_texts(texts)? {
                    tracing::info!(files = %names(&this.files), "{what}: using the renewed files");
                    on_change(&this.current());
                }
                Ok(())
            };
            crate::mounted::follow(what, read, apply).await
        })
    }
}

fn read_all(files: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    files.iter().map(|f| std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))).collect()
}

fn names(files: &[PathBuf]) -> String {
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(" and ")
}

/// A served certificate chain with its key, and when it expires.
#[derive(Debug)]
pub struct ServedCert {
    key: Arc<rustls::sign::CertifiedKey>,
    /// The certificate's notAfter, in seconds since the epoch.
    pub not_after: i64,
}

/// A certificate served from `tls.crt` and `tls.key` of a mounted kubernetes.io/tls Secret.
pub type CertFiles = Reloading<ServedCert>;

impl Reloading<ServedCert> {
    pub fn load_pair(cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> anyhow::Result<Arc<Self>> {
        Self::load(vec![cert_file.into(), key_file.into()], |texts| parse_pair(&texts[0], &texts[1]))
    }

    /// The served certificate's notAfter, in seconds since the epoch.
    pub fn not_after(&self) -> i64 {
        self.current().not_after
    }

    /// A server configuration that serves whatever pair was read last.
    pub fn server_config(self: &Arc<Self>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        Ok(with_alpn(server_config_builder()?.with_cert_resolver(Arc::new(Resolver(self.clone())))))
    }
}

#[derive(Debug)]
struct Resolver(Arc<CertFiles>);

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading").field("files", &self.files).finish_non_exhaustive()
    }
}

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.current().key.clone())
    }
}

/// A server configuration for a fixed certificate (the engine API's generated one).
pub fn server_config(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().context("bad certificate PEM")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("bad private key PEM")?;
    Ok(with_alpn(server_config_builder()?.with_single_cert(certs, key)?))
}

fn server_config_builder() -> anyhow::Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::server::WantsServerCert>> {
    Ok(rustls::ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?.with_no_client_auth())
}

/// Both servers speak HTTP/1.1 only (axum without its http2 feature).
fn with_alpn(mut config: rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The notAfter of the first certificate in `cert_pem`, in seconds since the epoch.
pub fn not_after(cert_pem: &str) -> anyhow::Result<i64> {
    let first = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).next().context("no certificate in the certificate file")?.context("bad certificate PEM")?;
    first_not_after(&[first])
}

pub(crate) fn first_not_after(chain: &[CertificateDer<'_>]) -> anyhow::Result<i64> {
    let first = chain.first().context("no certificate in the certificate file")?;
    let (_, parsed) = x509_parser::parse_x509_certificate(first.as_ref()).map_err(|e| anyhow::anyhow!("bad certificate: {e}"))?;
    Ok(parsed.validity().not_after.timestamp())
}

fn parse_pair(cert_pem: &str, key_pem: &str) -> anyhow::Result<ServedCert> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().context("bad certificate PEM")?;
    let not_after = first_not_after(&certs)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("bad private key PEM")?;
    let key = rustls::sign::CertifiedKey::from_der(certs, key, &provider()).context("the key does not fit the certificate")?;
    Ok(ServedCert { key: Arc::new(key), not_after })
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
        let client_config = rustls::ClientConfig::builder_with_provider(provider())
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
        files.current().key.end_entity_cert().unwrap().to_vec()
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
        let files = CertFiles::load_pair(&cert_file, &key_file).unwrap();
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
        // A file gone (a Secret volume mid-update, or the Secret deleted) keeps the pair too.
        std::fs::remove_file(&key_file).unwrap();
        let e = files.reload().unwrap_err();
        assert!(format!("{e:#}").contains("cannot read") && format!("{e:#}").contains("tls.key"), "{e:#}");
        assert_eq!(served(&files), old_der);

        write(&renewed);
        assert!(files.reload().unwrap());
        assert_ne!(served(&files), old_der);
        assert_eq!(files.not_after(), 1_924_992_000);
        // At start nothing is served yet: a bad pair is an error, not a server without a certificate.
        std::fs::write(&key_file, &old.1).unwrap();
        let e = CertFiles::load_pair(&cert_file, &key_file).unwrap_err();
        assert!(format!("{e:#}").contains("tls.crt and") && format!("{e:#}").contains("the key does not fit"), "{e:#}");
    }
}
