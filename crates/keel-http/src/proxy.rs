//! Proxies: `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY`, read once.
//!
//! The rules are curl's, as hyper-util's `Matcher` implements them (the lowercase
//! names too; `NO_PROXY` takes hosts, domains with their subdomains, IPs and CIDR
//! ranges, or `*`), plus Go's one exception: a loopback destination (`127.0.0.0/8`,
//! `::1`, `localhost`, `*.localhost`) is always reached directly. A proxy elsewhere
//! cannot reach this machine's loopback: sending a local model's traffic to it (and its
//! credentials to a local server) is never what `HTTPS_PROXY` meant. An `https` destination is reached through an `http://` proxy by a
//! CONNECT tunnel, so the proxy never sees the traffic; a plain `http` one is sent to
//! the proxy in absolute form. The values are read when a process starts (or given by a
//! test), never per call: a process's environment is not something to mutate under
//! running threads.

use std::sync::{Arc, OnceLock};

use hyper_util::client::proxy::matcher::{Intercept, Matcher};

/// Where a client's connections go through a proxy.
#[derive(Clone)]
pub struct Proxies {
    values: ProxyValues,
    pub(crate) matcher: Arc<Matcher>,
}

/// The raw settings, which clients are shared by.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct ProxyValues {
    http: String,
    https: String,
    all: String,
    no: String,
}

impl ProxyValues {
    /// Whether the proxy of plain-http destinations has user information.
    pub(crate) fn plain_has_credentials(&self) -> bool {
        self.http.contains('@') || (self.http.is_empty() && self.all.contains('@'))
    }
}

impl std::fmt::Debug for Proxies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A proxy URL may carry a password: only whether each is set is shown.
        f.debug_struct("Proxies")
            .field("http", &!self.values.http.is_empty())
            .field("https", &!self.values.https.is_empty())
            .field("all", &!self.values.all.is_empty())
            .field("no_proxy", &self.values.no)
            .finish()
    }
}

impl PartialEq for Proxies {
    fn eq(&self, other: &Self) -> bool {
        self.values == other.values
    }
}

impl Eq for Proxies {}

impl Default for Proxies {
    /// No proxy at all.
    fn default() -> Self {
        Self::build(ProxyValues::default())
    }
}

impl Proxies {
    /// No proxy: every connection is direct.
    pub fn none() -> Self {
        Self::default()
    }

    /// Explicit settings, as the environment variables would hold them: `http` for
    /// `http://` destinations, `https` for `https://` ones (a proxy URL such as
    /// `http://user:pass@proxy:3128`; empty for none) and `no_proxy`'s list.
    pub fn new(http: &str, https: &str, no_proxy: &str) -> Self {
        Self::build(ProxyValues {
            http: http.to_owned(),
            https: https.to_owned(),
            all: String::new(),
            no: no_proxy.to_owned(),
        })
    }

    /// The settings found by `lookup` (an environment): `HTTPS_PROXY`, `HTTP_PROXY`,
    /// `ALL_PROXY`, `NO_PROXY`, each also in lowercase (the lowercase name wins, as in
    /// curl). Under CGI (`REQUEST_METHOD` set) the uppercase `HTTP_PROXY` is ignored: a
    /// client's `Proxy:` request header arrives as that variable.
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Self {
        let cgi = lookup("REQUEST_METHOD").is_some();
        let first = |names: &[&str]| names.iter().find_map(|n| lookup(n)).unwrap_or_default();
        Self::build(ProxyValues {
            http: if cgi { first(&["http_proxy"]) } else { first(&["http_proxy", "HTTP_PROXY"]) },
            https: first(&["https_proxy", "HTTPS_PROXY"]),
            all: first(&["all_proxy", "ALL_PROXY"]),
            no: first(&["no_proxy", "NO_PROXY"]),
        })
    }

    /// The process's settings, read from its environment the first time this is
    /// called and never again.
    pub fn from_env() -> Self {
        static PROCESS: OnceLock<Proxies> = OnceLock::new();
        PROCESS.get_or_init(|| Self::from_lookup(&|name| std::env::var(name).ok())).clone()
    }

    /// Whether any proxy is set.
    pub fn is_set(&self) -> bool {
        !(self.values.http.is_empty() && self.values.https.is_empty() && self.values.all.is_empty())
    }

    fn build(values: ProxyValues) -> Self {
        let matcher = Matcher::builder()
            .http(values.http.as_str())
            .https(values.https.as_str())
            .all(values.all.as_str())
            .no(values.no.as_str())
            .build();
        Self { values, matcher: Arc::new(matcher) }
    }

    /// The proxy `dst` goes through, if any.
    pub(crate) fn proxy_for(&self, dst: &http::Uri) -> Option<Intercept> {
        if dst.host().is_none_or(is_loopback) {
            return None;
        }
        self.matcher.intercept(dst)
    }

    pub(crate) fn values(&self) -> &ProxyValues {
        &self.values
    }
}

/// Whether `host` (a URI's, IPv6 in brackets) names this machine's loopback.
fn is_loopback(host: &str) -> bool {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => {
            let name = bare.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::Proxies;

    fn proxy_of(p: &Proxies, url: &str) -> Option<String> {
        p.proxy_for(&url.parse().unwrap()).map(|i| i.uri().to_string())
    }

    #[test]
    fn lowercase_wins_and_no_proxy_bypasses_hosts_domains_and_ranges() {
        let env = |name: &str| match name {
            "HTTPS_PROXY" => Some("http://upper:3128".to_owned()),
            "https_proxy" => Some("http://lower:3128".to_owned()),
            "HTTP_PROXY" => Some("http://plain:8080".to_owned()),
            "NO_PROXY" => Some("internal.example, 10.0.0.0/8,localhost".to_owned()),
            _ => None,
        };
        let p = Proxies::from_lookup(&env);
        assert!(p.is_set());
        assert_eq!(proxy_of(&p, "https://api.example.com/v1").as_deref(), Some("http://lower:3128/"));
        assert_eq!(proxy_of(&p, "http://api.example.com/v1").as_deref(), Some("http://plain:8080/"));
        for direct in [
            "https://internal.example/",
            "https://models.internal.example/",
            "https://10.1.2.3/",
            "http://localhost:8080/",
        ] {
            assert_eq!(proxy_of(&p, direct), None, "{direct}");
        }
        assert_eq!(proxy_of(&p, "https://notinternal.example/").as_deref(), Some("http://lower:3128/"));
    }

    #[test]
    fn loopback_destinations_are_always_direct() {
        let p = Proxies::new("http://proxy:8080", "http://proxy:3128", "");
        for direct in [
            "http://127.0.0.1:8080/v1",
            "https://127.9.9.9/",
            "https://[::1]:8443/",
            "http://localhost/",
            "http://LocalHost.:80/",
            "https://models.localhost/",
        ] {
            assert_eq!(proxy_of(&p, direct), None, "{direct}");
        }
        for proxied in
            ["https://10.0.0.1/", "https://localhost.example/", "http://128.0.0.1/", "https://[::2]/"]
        {
            assert!(proxy_of(&p, proxied).is_some(), "{proxied}");
        }
    }

    #[test]
    fn under_cgi_the_uppercase_http_proxy_is_a_request_header_and_ignored() {
        let env = |name: &str| match name {
            "REQUEST_METHOD" => Some("GET".to_owned()),
            "HTTP_PROXY" => Some("http://attacker:8080".to_owned()),
            _ => None,
        };
        let p = Proxies::from_lookup(&env);
        assert_eq!(proxy_of(&p, "http://api.example.com/"), None);
        assert!(!p.is_set());
    }

    #[test]
    fn debug_shows_no_proxy_password() {
        let p = Proxies::new("", "http://user:hunter2@proxy:3128", "");
        assert!(!format!("{p:?}").contains("hunter2"));
    }

    #[test]
    fn junk_values_mean_no_proxy_rather_than_a_panic() {
        for junk in ["", "::::", "http://", "ftp://proxy:21", "\u{0}", "http://[::1", "💥"] {
            let p = Proxies::new(junk, junk, junk);
            let _ = proxy_of(&p, "https://api.example.com/");
            let _ = proxy_of(&p, "http://api.example.com/");
        }
    }
}
