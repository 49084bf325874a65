//! TLS from the browser bridge to the hypervisor's SPICE `tls-port`: the browser cannot speak
//! SPICE TLS itself, so the bridge does, verifying the hypervisor's certificate against the CA
//! from the SpiceProxy spec and, like spice-gtk's `host-subject`, matching the certificate's
//! subject instead of its name when one is given.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

/// The bridge's TLS client for hypervisors, with the CA read last from the mounted Secret: oVirt
/// rotates its CA by publishing the new one beside the old, and hypervisors then move to
/// certificates the new one signed, with no proxy restart in between.
pub type HypervisorTls = crate::tls::Reloading<HypervisorCa>;

/// The TLS client configuration from one reading of the CA file.
pub struct HypervisorCa {
    pub config: Arc<rustls::ClientConfig>,
    /// The latest notAfter of the CA certificates, in seconds since the epoch: once it has
    /// passed, no hypervisor certificate can be trusted and every browser console fails. (The
    /// earliest would alarm during every rotation, when the old CA is about to go.)
    pub not_after: i64,
}

/// Reads the CA file (at start a bad one is an error) and keeps it as `HypervisorTls`.
pub fn load(ca_file: &str, host_subject: Option<String>) -> anyhow::Result<Arc<HypervisorTls>> {
    crate::tls::Reloading::load(vec![ca_file.into()], move |texts| hypervisor_ca(&texts[0], host_subject.as_deref()))
}

/// The bridge's TLS client for hypervisors, and when its CAs expire, from one parse of the PEM.
pub fn hypervisor_ca(ca_pem: &str, host_subject: Option<&str>) -> anyhow::Result<HypervisorCa> {
    let provider = crate::tls::provider();
    let certs = CertificateDer::pem_slice_iter(ca_pem.as_bytes()).collect::<Result<Vec<_>, _>>().map_err(|e| anyhow::anyhow!("bad CA PEM: {e}"))?;
    let not_after = certs.iter().filter_map(|c| crate::tls::first_not_after(std::slice::from_ref(c)).ok()).max();
    let Some(not_after) = not_after else { anyhow::bail!("the hypervisor CA file holds no certificate") };
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert)?;
    }
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let verifier = Arc::new(SubjectVerifier { inner: webpki, host_subject: host_subject.map(normalize) });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous() // a verifier of our own: the chain is still checked by webpki
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(HypervisorCa { config: Arc::new(config), not_after })
}

/// `C=IL, L=Raanana, O=Red Hat, CN=host` and `CN=host,O=Red Hat,L=Raanana,C=IL` are the same
/// subject: spice-gtk matches each component, in any order.
fn normalize(subject: &str) -> String {
    let mut parts: Vec<&str> = subject.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
    parts.sort_unstable();
    parts.join(",")
}

#[cfg(test)]
mod tests {
    #[test]
    fn subjects_compare_by_component() {
        assert_eq!(super::normalize("O=example, CN=host1"), super::normalize("CN=host1,O=example"));
        assert_ne!(super::normalize("O=example, CN=host1"), super::normalize("O=example, CN=host2"));
    }

    /// A CA file that holds no usable certificate (emptied, or garbled mid-update) keeps the CA
    /// read before: consoles keep opening. At start the same file is an error naming it.
    #[test]
    fn a_ca_file_without_a_usable_certificate_keeps_the_ca_read_before() {
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.crt");
        std::fs::write(&file, ca.pem()).unwrap();
        let tls = super::load(file.to_str().unwrap(), None).unwrap();
        let before = tls.current();
        for (text, says) in [("", "holds no certificate"), ("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n", "bad CA PEM")] {
            std::fs::write(&file, text).unwrap();
            let e = format!("{:#}", tls.reload().unwrap_err());
            assert!(e.contains(says) && e.contains("ca.crt"), "{e}");
            assert!(std::sync::Arc::ptr_eq(&before, &tls.current()), "the CA read before is still used");
            let e = format!("{:#}", super::load(file.to_str().unwrap(), None).unwrap_err());
            assert!(e.contains(says) && e.contains("ca.crt"), "{e}");
        }
        std::fs::write(&file, ca.pem() + &ca.pem()).unwrap();
        assert!(tls.reload().unwrap(), "a changed file is read");
        assert!(!std::sync::Arc::ptr_eq(&before, &tls.current()));
    }

    /// A hypervisor whose TLS library offers it (OpenSSL 3.5+) gets hybrid post-quantum key
    /// exchange: its key share is the first the bridge sends.
    #[test]
    fn the_bridge_offers_post_quantum_key_exchange_first() {
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().self_signed(&key).unwrap();
        let config = super::hypervisor_ca(&ca.pem(), None).unwrap().config;
        let groups: Vec<_> = config.crypto_provider().kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(groups.first(), Some(&rustls::NamedGroup::X25519MLKEM768), "{groups:?}");
        assert!(groups.contains(&rustls::NamedGroup::X25519), "classical groups stay for older hypervisors: {groups:?}");
    }
}

/// The subject of a DER certificate in the same notation.
pub fn subject_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(normalize(&parsed.subject().to_string()))
}

#[derive(Debug)]
struct SubjectVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    host_subject: Option<String>,
}

impl ServerCertVerifier for SubjectVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let result = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        let Some(want) = &self.host_subject else { return result };
        match result {
            // The chain is valid; the subject decides, not the name (spice-gtk's host-subject).
            Ok(_) | Err(Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {
                if subject_of(end_entity).as_deref() == Some(want.as_str()) {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(Error::General(format!("hypervisor certificate subject {:?} is not {want:?}", subject_of(end_entity).unwrap_or_default())))
                }
            }
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
