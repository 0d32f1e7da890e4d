//! The rustls server configuration for `wss://` (PROTOCOL.md section 1).
//!
//! Owns: reading the certificate chain and private key files, each PEM or DER whatever its
//! extension (the Link IoT Edge console calls them `.cer` and `.pvk`), keys in PKCS#8, PKCS#1
//! (RSA) or SEC1 (EC); checking that key and certificate belong together; and the protocol
//! choice: TLS 1.2 and 1.3 with the ring provider, TLS 1.2 limited to ECDHE with AES-GCM, no
//! client certificate.
//!
//! Never: sockets or handshakes; the shards drive `rustls::ServerConnection`s with this config.
//! Every error names the file at fault.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring as provider;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, ServerConfig, SupportedCipherSuite};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: the file is empty", file.display())]
    Empty { file: PathBuf },
    #[error("{}: not a PEM or DER {what}: {message}", file.display())]
    Malformed {
        file: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("{}: unsupported private key: {message}", file.display())]
    UnsupportedKey { file: PathBuf, message: String },
    #[error(
        "{} and {}: the private key does not belong to the certificate",
        key.display(),
        cert.display()
    )]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("{} and {}: {message}", cert.display(), key.display())]
    Rejected {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
}

impl TlsError {
    /// A short stable label for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Empty { .. } => "empty",
            Self::Malformed { .. } => "malformed",
            Self::UnsupportedKey { .. } => "unsupported_key",
            Self::Mismatch { .. } => "mismatch",
            Self::Rejected { .. } => "rejected",
        }
    }
}

/// The server configuration for a certificate chain file and its private key file.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    let provider = Arc::new(crypto_provider());
    let signing_key = provider
        .key_provider
        .load_private_key(key_der.clone_key())
        .map_err(|e| TlsError::UnsupportedKey {
            file: key.to_owned(),
            message: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain.clone(), signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        // The key cannot tell its public half; the handshake will show a mismatch instead.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsError::Mismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            })
        }
        Err(e) => {
            return Err(TlsError::Malformed {
                file: cert.to_owned(),
                what: "certificate",
                message: e.to_string(),
            })
        }
    }
    let rejected = |e: rustls::Error| TlsError::Rejected {
        cert: cert.to_owned(),
        key: key.to_owned(),
        message: e.to_string(),
    };
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(rejected)?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(rejected)?;
    Ok(Arc::new(config))
}

/// The ring provider with TLS 1.2 limited to ECDHE + AES-GCM; every TLS 1.3 suite stays.
pub fn crypto_provider() -> CryptoProvider {
    let mut p = provider::default_provider();
    p.cipher_suites.retain(|s| match s {
        SupportedCipherSuite::Tls13(_) => true,
        SupportedCipherSuite::Tls12(_) => TLS12_SUITES.contains(&s.suite()),
    });
    p
}

/// ECDHE with AES-GCM, ECDSA and RSA certificates.
const TLS12_SUITES: [CipherSuite; 4] = [
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
];

fn read(file: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(file).map_err(|source| TlsError::Read {
        file: file.to_owned(),
        source,
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(TlsError::Empty {
            file: file.to_owned(),
        });
    }
    Ok(bytes)
}

/// PEM when the file has a `-----BEGIN` line, DER otherwise; whatever the extension.
fn is_pem(bytes: &[u8]) -> bool {
    bytes.windows(10).any(|w| w == b"-----BEGIN")
}

/// The certificates of `file`, PEM (every CERTIFICATE section, in order) or DER (one); for the
/// server's chain and for the CA files of clients (the MQTT sink).
pub fn load_certs(file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(file)?;
    let malformed = |message: String| TlsError::Malformed {
        file: file.to_owned(),
        what: "certificate",
        message,
    };
    if !is_pem(&bytes) {
        // A DER certificate is one SEQUENCE; rustls checks the rest when it parses it.
        if bytes.first() != Some(&0x30) {
            return Err(malformed("neither PEM nor a DER SEQUENCE".into()));
        }
        return Ok(vec![CertificateDer::from(bytes)]);
    }
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| malformed(e.to_string()))?;
    if chain.is_empty() {
        return Err(malformed("no CERTIFICATE section".into()));
    }
    Ok(chain)
}

/// The private key of `file`: PKCS#8, PKCS#1 (RSA) or SEC1 (EC), PEM or DER.
pub fn load_key(file: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(file)?;
    let malformed = |message: String| TlsError::Malformed {
        file: file.to_owned(),
        what: "private key (PKCS#8, PKCS#1 or SEC1)",
        message,
    };
    if !is_pem(&bytes) {
        return PrivateKeyDer::try_from(bytes.as_slice())
            .map(|k| k.clone_key())
            .map_err(|e| malformed(e.to_owned()));
    }
    // The first key section; others (e.g. `EC PARAMETERS` before an EC key) are skipped.
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => {
            malformed("no PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY section".into())
        }
        e => malformed(e.to_string()),
    })
}

#[cfg(test)]
mod tests;
