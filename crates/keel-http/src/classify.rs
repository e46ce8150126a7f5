//! The one place transport errors become an [`ErrorClass`]: every HTTP target (model
//! upstreams, http tools) fails through here.
//!
//! A refused, reset or timed-out connection is worth another attempt (`network`,
//! `timeout`). A certificate that is not trusted, has expired or names another host is
//! not: the next attempt meets the same certificate, so it is `invalid_request`
//! (terminal, never retried), with a message naming the host, the cause and the fix.
//! The same goes for a client certificate the server refuses, a URL whose scheme does
//! not match what the port speaks and a proxy that wants credentials.

use std::error::Error as StdError;

use keel_core::{ErrorClass, Failure};
use rustls::{AlertDescription, CertificateError};

use crate::connect::{ProxyError, UnsupportedProxy, UnsupportedScheme};

/// When the error happened: opening the connection, or later on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Connecting, the TLS handshake, sending the request or reading the response head.
    Request,
    /// Reading the response's body.
    Body,
}

/// Classifies a transport error of a call to `host`: the error and its sources are
/// searched for what they say (a TLS error, a proxy's answer, an I/O error kind).
pub fn transport_failure(error: &(dyn StdError + 'static), host: &str, stage: Stage) -> Failure {
    let mut tls = None;
    let mut io_kind = None;
    let mut proxy = None;
    let mut unsupported = None;
    for e in chain(error) {
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            tls.get_or_insert(t);
        } else if let Some(p) = e.downcast_ref::<ProxyError>() {
            proxy.get_or_insert(p);
        } else if e.is::<UnsupportedScheme>() || e.is::<UnsupportedProxy>() {
            unsupported.get_or_insert(e);
        } else if let Some(io) = e.downcast_ref::<std::io::Error>() {
            io_kind.get_or_insert(io.kind());
        }
    }
    if let Some(e) = unsupported {
        return Failure::new(ErrorClass::InvalidRequest, format!("cannot reach {host}: {e}"));
    }
    if let Some(t) = tls {
        return tls_failure(t, host);
    }
    if let Some(alert) = alert_in_text(error) {
        return tls_failure(&rustls::Error::AlertReceived(alert), host);
    }
    if let Some(ProxyError::Refused(code, _)) = proxy {
        let e = proxy.map(ToString::to_string).unwrap_or_default();
        let (class, fix) = match code {
            407 => (
                ErrorClass::Unauthorized,
                "give its credentials in the proxy's URL (HTTPS_PROXY=http://user:password@proxy:3128)",
            ),
            403 => (
                ErrorClass::Forbidden,
                "the proxy does not allow this destination: add it to NO_PROXY or to the proxy's rules",
            ),
            // The proxy could not reach the destination, or is overloaded: maybe later.
            500..=599 => (ErrorClass::Network, "the proxy could not reach it"),
            _ => (ErrorClass::InvalidRequest, "check HTTPS_PROXY"),
        };
        return Failure::new(class, format!("no tunnel to {host}: {e}: {fix}"));
    }
    let what = match stage {
        Stage::Request if is_connect(error) => format!("cannot connect to {host}"),
        Stage::Request => format!("the connection to {host} failed"),
        Stage::Body => format!("reading the answer of {host} failed"),
    };
    let class = match io_kind {
        Some(std::io::ErrorKind::TimedOut) => ErrorClass::Timeout,
        // Refused, reset, unreachable, DNS, early EOF: the other side went away.
        _ => ErrorClass::Network,
    };
    Failure::new(class, format!("{what}: {}", describe(error)))
}

/// The failure of a TLS error of a call to `host`.
fn tls_failure(e: &rustls::Error, host: &str) -> Failure {
    use rustls::Error as E;
    let terminal = |message: String| Failure::new(ErrorClass::InvalidRequest, message);
    match e {
        E::InvalidCertificate(cert) => terminal(match cert {
            CertificateError::UnknownIssuer
            | CertificateError::BadSignature
            | CertificateError::UnknownRevocationStatus => format!(
                "the certificate for {host} is not trusted ({e}): add its CA to this target as `ca_file` \
                 (a PEM file)"
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("the certificate for {host} has expired ({e}): the server must renew it")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => format!(
                "the certificate for {host} is not valid yet ({e}): check this machine's clock and the \
                 certificate's dates"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                "the certificate presented by {host} is not valid for that name ({e}): use a host name \
                 the certificate names in the URL"
            ),
            CertificateError::Revoked => format!("the certificate for {host} has been revoked ({e})"),
            _ => format!("the certificate for {host} was refused: {e}"),
        }),
        E::AlertReceived(AlertDescription::CertificateRequired) => terminal(format!(
            "{host} requires a client certificate ({e}): set this target's `client_cert_file` and \
             `client_key_file`"
        )),
        E::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::AccessDenied,
        ) => terminal(format!(
            "{host} refused the client certificate ({e}): check `client_cert_file` and that the server \
             trusts its CA"
        )),
        E::AlertReceived(
            AlertDescription::HandshakeFailure
            | AlertDescription::ProtocolVersion
            | AlertDescription::InsufficientSecurity,
        )
        | E::PeerIncompatible(_)
        | E::NoApplicationProtocol => terminal(format!(
            "the TLS handshake with {host} failed ({e}): no TLS version or cipher in common, or the \
             server wants a client certificate (`client_cert_file`)"
        )),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            terminal(format!(
                "{host} does not speak TLS on this port ({e}): is the URL's scheme right (http:// or \
                 https://)?"
            ))
        }
        E::NoCertificatesPresented => {
            terminal(format!("{host} presented no certificate ({e}): it cannot be reached over https"))
        }
        // Decryption failures, a peer misbehaving mid-connection: a broken connection.
        _ => Failure::new(ErrorClass::Network, format!("the TLS connection to {host} failed: {e}")),
    }
}

/// The alerts a server sends after a TLS 1.3 handshake, when it checks the client's
/// certificate.
const LATE_ALERTS: [AlertDescription; 8] = [
    AlertDescription::CertificateRequired,
    AlertDescription::BadCertificate,
    AlertDescription::UnknownCA,
    AlertDescription::CertificateUnknown,
    AlertDescription::UnsupportedCertificate,
    AlertDescription::CertificateRevoked,
    AlertDescription::CertificateExpired,
    AlertDescription::AccessDenied,
];

/// A TLS alert named in the text of `error` only. In TLS 1.3 a server refuses a client
/// certificate after the handshake, so the alert arrives on the first read, and over
/// HTTP/2 the h2 crate keeps an I/O error's kind and text but not the error itself:
/// rustls's own wording (`received fatal alert: CertificateRequired`) is all there is.
fn alert_in_text(error: &(dyn StdError + 'static)) -> Option<AlertDescription> {
    let text = describe(error);
    LATE_ALERTS.into_iter().find(|alert| {
        let said = rustls::Error::AlertReceived(*alert).to_string();
        // `BadCertificate` must not match a longer name that starts with it.
        text.match_indices(&said).any(|(at, _)| !text[at + said.len()..].starts_with(char::is_alphanumeric))
    })
}

/// `error` and its sources; an I/O error's inner error is visited too (its `source`
/// skips it).
fn chain<'a>(error: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut out = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        out.push(e);
        next = match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
        if out.len() > 32 {
            break; // a cycle would be a bug elsewhere; never loop on it
        }
    }
    out
}

fn is_connect(error: &(dyn StdError + 'static)) -> bool {
    chain(error)
        .iter()
        .any(|e| e.downcast_ref::<hyper_util::client::legacy::Error>().is_some_and(|e| e.is_connect()))
}

/// `error` and its sources in one line, each said once.
pub(crate) fn describe(error: &(dyn StdError + 'static)) -> String {
    let mut out = String::new();
    for e in chain(error) {
        let text = e.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io;

    use keel_core::ErrorClass;
    use rustls::{AlertDescription, CertificateError};

    use super::{Stage, transport_failure};

    fn check(error: io::Error, class: ErrorClass, says: &str) {
        let f = transport_failure(&error, "api.example.com", Stage::Request);
        assert_eq!(f.class, class, "{}", f.message);
        assert!(f.message.contains(says), "{:?} should say {says:?}", f.message);
        assert!(f.message.contains("api.example.com"), "{:?} names the host", f.message);
    }

    fn tls(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn transport_errors_get_their_classes() {
        use ErrorClass::{InvalidRequest as Terminal, Network, Timeout};
        check(io::Error::from(io::ErrorKind::ConnectionRefused), Network, "failed");
        check(io::Error::from(io::ErrorKind::ConnectionReset), Network, "failed");
        check(io::Error::from(io::ErrorKind::UnexpectedEof), Network, "failed");
        check(io::Error::from(io::ErrorKind::TimedOut), Timeout, "failed");
        check(tls(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)), Terminal, "`ca_file`");
        check(tls(rustls::Error::InvalidCertificate(CertificateError::Expired)), Terminal, "expired");
        check(tls(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)), Terminal, "name");
        check(tls(rustls::Error::InvalidCertificate(CertificateError::NotValidYet)), Terminal, "clock");
        check(
            tls(rustls::Error::AlertReceived(AlertDescription::CertificateRequired)),
            Terminal,
            "`client_cert_file`",
        );
        check(tls(rustls::Error::AlertReceived(AlertDescription::UnknownCA)), Terminal, "client certificate");
        check(tls(rustls::Error::AlertReceived(AlertDescription::HandshakeFailure)), Terminal, "handshake");
        check(
            tls(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)),
            Terminal,
            "http:// or https://",
        );
        check(tls(rustls::Error::DecryptError), Network, "TLS connection");
        // Only the text left (h2 keeps an I/O error's kind and message).
        check(
            io::Error::other("connection error: received fatal alert: CertificateRequired"),
            Terminal,
            "requires a client certificate",
        );
        check(io::Error::other("received fatal alert: CertificateRequiredX"), Network, "failed");
        // Wrapped again, as hyper and the pool wrap it: still found.
        let nested =
            io::Error::other(tls(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)));
        check(nested, Terminal, "not trusted");
    }
}
