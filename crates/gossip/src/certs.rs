//! The cluster CA, node certificates, and the rustls configurations built from them.
//!
//! Files (PEM): a CA directory holds `ca.pem` and `ca.key`; a node's directory holds `node.pem`,
//! `node.key` and a copy of `ca.pem`, so one directory is all a node needs. Keys are written with
//! mode 0600 and never overwritten. A node certificate names the node id as its only DNS name and
//! is valid for both TLS client and server use, since every node both dials and accepts.
//!
//! Verification: both sides of every connection must present a certificate chaining to the cluster
//! CA (the only root trusted); the dialer also checks that the certificate names the node it meant
//! to dial.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::{is_valid_name, Error};

/// The CA certificate's file name.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key's file name (only in the CA directory).
pub const CA_KEY_FILE: &str = "ca.key";
/// A node certificate's file name.
pub const NODE_CERT_FILE: &str = "node.pem";
/// A node private key's file name.
pub const NODE_KEY_FILE: &str = "node.key";

/// ALPN protocol id: the gossip protocol's name and version, checked in the TLS handshake.
pub(crate) const ALPN: &[u8] = b"bunting-gossip/1";

const CA_VALIDITY_DAYS: i64 = 10 * 365;
const NODE_VALIDITY_DAYS: i64 = 2 * 365;

/// Where [`init_ca`] wrote the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where [`issue`] wrote a node's certificate, key and the CA certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates a new cluster CA (ECDSA P-256, valid ten years) in `dir`. Refuses to overwrite one.
pub fn init_ca(dir: &Path) -> Result<CaFiles, Error> {
    let files = CaFiles {
        cert: dir.join(CA_CERT_FILE),
        key: dir.join(CA_KEY_FILE),
    };
    for path in [&files.cert, &files.key] {
        if path.exists() {
            return Err(Error::Exists(path.clone()));
        }
    }
    let key = KeyPair::generate().map_err(cert_error)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "Bunting cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key).map_err(cert_error)?;
    create_dir(dir)?;
    write_new(&files.key, key.serialize_pem().as_bytes(), true)?;
    write_new(&files.cert, cert.pem().as_bytes(), false)?;
    Ok(files)
}

/// Whether `dir` already holds a CA (so `bunting certs init` can be idempotent).
pub fn ca_exists(dir: &Path) -> bool {
    dir.join(CA_CERT_FILE).exists() && dir.join(CA_KEY_FILE).exists()
}

/// Whether `dir` already holds a node's certificate, key and CA copy (so `bunting dev` can issue
/// only what is missing).
pub fn node_files_exist(dir: &Path) -> bool {
    [CA_CERT_FILE, NODE_CERT_FILE, NODE_KEY_FILE]
        .iter()
        .all(|f| dir.join(f).exists())
}

/// Issues a certificate for node `node` (valid two years) signed by the CA in `ca_dir`, and writes
/// it with its key and the CA certificate into `out_dir`. Refuses to overwrite a node key.
pub fn issue(ca_dir: &Path, node: &str, out_dir: &Path) -> Result<NodeFiles, Error> {
    if !is_valid_name(node) {
        return Err(Error::InvalidName(node.to_owned()));
    }
    let files = NodeFiles {
        ca: out_dir.join(CA_CERT_FILE),
        cert: out_dir.join(NODE_CERT_FILE),
        key: out_dir.join(NODE_KEY_FILE),
    };
    for path in [&files.cert, &files.key] {
        if path.exists() {
            return Err(Error::Exists(path.clone()));
        }
    }
    let ca_pem = read_string(&ca_dir.join(CA_CERT_FILE))?;
    let ca_key = KeyPair::from_pem(&read_string(&ca_dir.join(CA_KEY_FILE))?).map_err(cert_error)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(cert_error)?;

    let key = KeyPair::generate().map_err(cert_error)?;
    let mut params = CertificateParams::new(vec![node.to_owned()]).map_err(cert_error)?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, node);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, NODE_VALIDITY_DAYS);
    let cert = params.signed_by(&key, &issuer).map_err(cert_error)?;

    create_dir(out_dir)?;
    write_new(&files.key, key.serialize_pem().as_bytes(), true)?;
    write_new(&files.cert, cert.pem().as_bytes(), false)?;
    if files.ca != ca_dir.join(CA_CERT_FILE) {
        std::fs::write(&files.ca, ca_pem.as_bytes()).map_err(|source| Error::Io {
            path: files.ca.clone(),
            source,
        })?;
    }
    Ok(files)
}

/// A node's TLS identity: the cluster CA it trusts, its certificate and key, and the node id the
/// certificate names.
#[derive(Debug)]
pub struct NodeTls {
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    node: String,
}

impl Clone for NodeTls {
    fn clone(&self) -> Self {
        NodeTls {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            node: self.node.clone(),
        }
    }
}

impl NodeTls {
    /// Loads `ca.pem`, `node.pem` and `node.key` from a directory written by [`issue`].
    pub fn load(dir: &Path) -> Result<NodeTls, Error> {
        NodeTls::from_pem(
            &read_string(&dir.join(CA_CERT_FILE))?,
            &read_string(&dir.join(NODE_CERT_FILE))?,
            &read_string(&dir.join(NODE_KEY_FILE))?,
        )
    }

    /// Builds the identity from PEM text: the CA certificate, the node's certificate (chain) and
    /// its private key.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<NodeTls, Error> {
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| Error::Certificate(format!("CA certificate: {e}")))?;
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Certificate(format!("node certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| Error::Certificate(format!("node key: {e}")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| Error::Certificate("no node certificate in the PEM".into()))?;
        let node = node_id_of(leaf)?;
        Ok(NodeTls {
            ca,
            chain,
            key,
            node,
        })
    }

    /// The node id the certificate names.
    pub fn node_id(&self) -> &str {
        &self.node
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, Error> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| Error::Certificate(format!("CA certificate: {e}")))?;
        Ok(Arc::new(roots))
    }

    /// The QUIC server side: requires a client certificate from the cluster CA.
    pub(crate) fn server_config(&self) -> Result<quinn::ServerConfig, Error> {
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(tls_error)?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls_error)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(tls_error)?;
        Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
    }

    /// The QUIC client side: trusts only the cluster CA and presents this node's certificate.
    pub(crate) fn client_config(&self) -> Result<quinn::ClientConfig, Error> {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_error)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls_error)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(tls_error)?;
        Ok(quinn::ClientConfig::new(Arc::new(quic)))
    }
}

/// The node id a (verified) certificate names: its first DNS subject alternative name.
pub(crate) fn node_id_of(cert: &CertificateDer<'_>) -> Result<String, Error> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| Error::Certificate(format!("unparsable certificate: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| Error::Certificate(format!("subject alternative name: {e}")))?;
    let name = san.and_then(|ext| {
        ext.value.general_names.iter().find_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(name) => Some((*name).to_owned()),
            _ => None,
        })
    });
    match name {
        Some(name) if is_valid_name(&name) => Ok(name),
        Some(name) => Err(Error::InvalidName(name)),
        None => Err(Error::Certificate("certificate names no node".into())),
    }
}

/// The one crypto provider of the workspace.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn set_validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for clocks that run a little behind the issuer's.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
    let mut serial = fastrand::u128(..).to_be_bytes();
    serial[0] &= 0x7f; // positive, as DER integers must be
    params.serial_number = Some(SerialNumber::from_slice(&serial));
}

fn cert_error(e: rcgen::Error) -> Error {
    Error::Certificate(e.to_string())
}

fn tls_error(e: impl std::fmt::Display) -> Error {
    Error::Tls(e.to_string())
}

fn read_string(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_owned(),
        source,
    })
}

/// Writes a file that must not exist yet; `secret` files are readable by the owner only.
fn write_new(path: &Path, bytes: &[u8], secret: bool) -> Result<(), Error> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Exists(path.to_owned())
        } else {
            io(e)
        }
    })?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificate_names_its_node_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init_ca(&dir.path().join("ca")).unwrap();
        assert!(ca.key.exists() && ca.cert.exists());
        let files = issue(&dir.path().join("ca"), "us-east-1", &dir.path().join("n1")).unwrap();
        assert!(files.ca.exists());
        let tls = NodeTls::load(&dir.path().join("n1")).unwrap();
        assert_eq!(tls.node_id(), "us-east-1");
        tls.server_config().unwrap();
        tls.client_config().unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "node key readable by others: {mode:o}");
        }
    }

    #[test]
    fn an_existing_ca_or_node_key_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        assert!(ca_exists(dir.path()));
        assert!(matches!(init_ca(dir.path()), Err(Error::Exists(_))));
        let out = dir.path().join("node");
        assert!(!node_files_exist(&out));
        issue(dir.path(), "eu-west-1", &out).unwrap();
        assert!(node_files_exist(&out));
        assert!(matches!(
            issue(dir.path(), "eu-west-1", &out),
            Err(Error::Exists(_))
        ));
    }

    #[test]
    fn node_names_that_are_not_dns_labels_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        for bad in ["", "Upper", "a b", "-lead", "trail-", "dot.ted"] {
            assert!(
                matches!(
                    issue(dir.path(), bad, &dir.path().join("x")),
                    Err(Error::InvalidName(_))
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn garbage_pem_is_an_error_not_a_panic() {
        assert!(NodeTls::from_pem("nope", "nope", "nope").is_err());
    }
}
