//! TLS settings of a target: which CAs it is trusted under and which client certificate
//! it is shown, read from PEM files into a rustls `ClientConfig`.
//!
//! Every target trusts Mozilla's roots (webpki-roots: the same set in every container,
//! no platform store to find); `ca_file` adds the CAs of an internal PKI to them for one
//! target. A client certificate is optional and needs both of its files. Problems are
//! found when the config is read, each naming its key, never at the first call.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// The TLS settings of one target (`ca_file`, `client_cert_file`, `client_key_file`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsConfig {
    /// A PEM file of CA certificates trusted for this target, besides the built-in roots.
    pub ca_file: Option<PathBuf>,
    /// A PEM file holding the client certificate (and its chain) shown to the server.
    pub client_cert_file: Option<PathBuf>,
    /// The PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub client_key_file: Option<PathBuf>,
}

impl TlsConfig {
    /// The same settings with every relative path taken from `dir` (a config file's
    /// directory).
    pub fn relative_to(&self, dir: &Path) -> Self {
        let join =
            |p: &Option<PathBuf>| p.as_ref().map(|p| if p.is_absolute() { p.clone() } else { dir.join(p) });
        Self {
            ca_file: join(&self.ca_file),
            client_cert_file: join(&self.client_cert_file),
            client_key_file: join(&self.client_key_file),
        }
    }
}

/// A problem with one TLS setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsError {
    /// The setting: `ca_file`, `client_cert_file` or `client_key_file`.
    pub key: &'static str,
    /// What is wrong, naming the file.
    pub message: String,
}

fn problem(key: &'static str, message: impl Into<String>) -> TlsError {
    TlsError { key, message: message.into() }
}

/// The bytes of the files of a [`TlsConfig`]: what a client is built from, and what
/// clients are shared by (two targets whose files hold the same bytes share one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct TlsFiles {
    ca: Option<Vec<u8>>,
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
}

/// The largest PEM file read: a bundle of every public CA is about 250 KiB.
const MAX_PEM: u64 = 4 << 20;

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let shown = path.display();
    // A directory, a FIFO (opening it would wait for a writer) or a device is refused
    // before it is opened.
    let meta = std::fs::metadata(path).map_err(|e| problem(key, format!("cannot read `{shown}`: {e}")))?;
    if !meta.is_file() {
        return Err(problem(key, format!("cannot read `{shown}`: not a regular file")));
    }
    let file = std::fs::File::open(path).map_err(|e| problem(key, format!("cannot read `{shown}`: {e}")))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| problem(key, format!("cannot read `{shown}`: {e}")))?;
    if bytes.len() as u64 > MAX_PEM {
        return Err(problem(key, format!("`{shown}` is larger than {} MiB: not a PEM file", MAX_PEM >> 20)));
    }
    Ok(bytes)
}

impl TlsFiles {
    /// Reads the files of `config`, and lists every file that cannot be read and a
    /// certificate without its key (or a key without its certificate).
    pub(crate) fn read(config: &TlsConfig) -> (Self, Vec<TlsError>) {
        let mut problems = Vec::new();
        let mut load = |key, path: &Option<PathBuf>| match path {
            None => None,
            Some(p) => match read(key, p) {
                Ok(b) => Some(b),
                Err(e) => {
                    problems.push(e);
                    None
                }
            },
        };
        let files = Self {
            ca: load("ca_file", &config.ca_file),
            cert: load("client_cert_file", &config.client_cert_file),
            key: load("client_key_file", &config.client_key_file),
        };
        match (&config.client_cert_file, &config.client_key_file) {
            (Some(_), None) => problems.push(problem(
                "client_cert_file",
                "a client certificate needs its private key: set `client_key_file` too",
            )),
            (None, Some(_)) => problems.push(problem(
                "client_key_file",
                "a private key needs its certificate: set `client_cert_file` too",
            )),
            _ => {}
        }
        (files, problems)
    }

    /// The rustls configuration: Mozilla's roots plus `ca_file`'s, the client
    /// certificate if any, ALPN offering HTTP/2 then HTTP/1.1.
    ///
    /// # Errors
    /// Every file that holds no usable PEM item, a key that does not match its
    /// certificate.
    pub(crate) fn client_config(&self, config: &TlsConfig) -> Result<Arc<ClientConfig>, Vec<TlsError>> {
        let shown = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let mut problems = Vec::new();
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(bytes) = &self.ca {
            let file = shown(&config.ca_file);
            match certificates(bytes) {
                Err(e) => problems.push(problem("ca_file", format!("`{file}` is not valid PEM: {e}"))),
                Ok(certs) if certs.is_empty() => problems.push(problem(
                    "ca_file",
                    format!("`{file}` holds no `BEGIN CERTIFICATE` block: give the CA's certificate in PEM"),
                )),
                Ok(certs) => {
                    for (i, cert) in certs.into_iter().enumerate() {
                        if let Err(e) = roots.add(cert) {
                            problems.push(problem(
                                "ca_file",
                                format!(
                                    "certificate {} of `{file}` is not a usable CA certificate: {e}",
                                    i + 1
                                ),
                            ));
                        }
                    }
                }
            }
        }
        let mut identity = None;
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            let files = (shown(&config.client_cert_file), shown(&config.client_key_file));
            identity =
                read_identity((cert, key), ("client_cert_file", "client_key_file"), files, &mut problems);
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let builder = ClientConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| vec![problem("ca_file", format!("no TLS version available: {e}"))])?
            .with_root_certificates(roots);
        let mut tls = match identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
                vec![problem(
                    "client_key_file",
                    format!(
                        "`{}` cannot be used with `{}`: {e}",
                        shown(&config.client_key_file),
                        shown(&config.client_cert_file)
                    ),
                )]
            })?,
        };
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(tls))
    }
}

/// A certificate chain and its private key from their PEM files' bytes; problems
/// named by `keys` and the files' names.
fn read_identity(
    (cert, key): (&[u8], &[u8]),
    keys: (&'static str, &'static str),
    (cert_file, key_file): (String, String),
    problems: &mut Vec<TlsError>,
) -> Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = match certificates(cert) {
        Err(e) => {
            problems.push(problem(keys.0, format!("`{cert_file}` is not valid PEM: {e}")));
            None
        }
        Ok(c) if c.is_empty() => {
            problems.push(problem(keys.0, format!("`{cert_file}` holds no `BEGIN CERTIFICATE` block")));
            None
        }
        Ok(c) => Some(c),
    };
    let key = match PrivateKeyDer::from_pem_slice(key) {
        Ok(k) => Some(k),
        Err(e) => {
            problems.push(problem(
                keys.1,
                format!("`{key_file}` holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
            ));
            None
        }
    };
    chain.zip(key)
}

/// `keel serve`'s own TLS: its certificate (with its chain) and private key, read from
/// PEM files. HTTP/1.1 over TLS 1.2 or 1.3.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// Reads `cert_file` and `key_file`.
    ///
    /// # Errors
    /// Every file that cannot be read or holds no usable PEM item, and a key that does
    /// not match its certificate, named `cert_file` or `key_file`.
    pub fn from_files(cert_file: &Path, key_file: &Path) -> Result<ServerTls, Vec<TlsError>> {
        let mut problems = Vec::new();
        let cert = read("cert_file", cert_file).map_err(|e| problems.push(e)).ok();
        let key = read("key_file", key_file).map_err(|e| problems.push(e)).ok();
        let identity = match (&cert, &key) {
            (Some(cert), Some(key)) => read_identity(
                (cert, key),
                ("cert_file", "key_file"),
                (cert_file.display().to_string(), key_file.display().to_string()),
                &mut problems,
            ),
            _ => None,
        };
        let Some((chain, key)) = identity else { return Err(problems) };
        let mut config = rustls::ServerConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| vec![problem("cert_file", format!("no TLS version available: {e}"))])?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| {
                vec![problem(
                    "key_file",
                    format!("`{}` cannot be used with `{}`: {e}", key_file.display(), cert_file.display()),
                )]
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)) })
    }

    /// The TLS handshake of a connection accepted on `io`: the stream to serve HTTP
    /// on. Bound it with a timeout: a client that never finishes holds a task.
    ///
    /// # Errors
    /// The handshake failed (a client that does not speak TLS, an alert).
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> std::io::Result<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + use<IO>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    {
        self.acceptor.accept(io).await
    }
}

/// Every `CERTIFICATE` block of a PEM file (other blocks are skipped).
fn certificates(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, rustls::pki_types::pem::Error> {
    CertificateDer::pem_slice_iter(bytes).collect()
}
