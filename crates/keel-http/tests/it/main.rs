//! keel-http against real TLS servers on loopback: a CA made in the test, certificates
//! valid, expired, for another name, required from the client; HTTP/2; a CONNECT proxy.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::Full;
use keel_core::{ErrorClass, Failure, Pipeline, PolicyConfig};
use keel_http::{Client, Proxies, TlsConfig};
use keel_testkit::tls::{ConnectProxy, HttpsServer, TestCa, Validity, server_config};

fn app() -> Router {
    Router::new().route("/hello", get(|| async { "hi" }))
}

/// A CA, a server for `names` with `validity`, and the CA written to a temp dir.
struct Setup {
    ca: TestCa,
    ca_file: PathBuf,
    dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("Keel test CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    Setup { ca, ca_file, dir }
}

async fn server(s: &Setup, names: &[&str], validity: Validity, h2: bool) -> HttpsServer {
    HttpsServer::start(server_config(&s.ca.server_cert(names, validity), None, h2), app()).await
}

fn trusting(s: &Setup) -> TlsConfig {
    TlsConfig { ca_file: Some(s.ca_file.clone()), ..TlsConfig::default() }
}

async fn get_hello(client: &Client, base: &str) -> Result<(http::Version, String), Failure> {
    let uri: http::Uri = format!("{base}/hello").parse().unwrap();
    let req = http::Request::get(uri.clone()).body(Full::new(Bytes::new())).unwrap();
    let resp = client.send(req).await?;
    let version = resp.version();
    let body = keel_http::read_body(resp.into_body(), 1 << 20, &uri).await?;
    Ok((version, String::from_utf8(body.to_vec()).unwrap()))
}

/// Calls through a default pipeline (retries on `network`/`timeout`...), counting attempts.
async fn through_pipeline(client: &Client, base: &str) -> (ErrorClass, u32, String) {
    let mut policy = PolicyConfig::default();
    policy.retry.base_delay = std::time::Duration::from_millis(1);
    let err = Pipeline::builder("t", policy).build().call(|_| get_hello(client, base)).await.unwrap_err();
    let message = err.to_string();
    (err.class, err.attempts, message)
}

#[tokio::test]
async fn a_server_signed_by_ca_file_is_reached_and_clients_with_the_same_files_share_a_pool() {
    let s = setup();
    let srv = server(&s, &["127.0.0.1"], Validity::Current, false).await;
    let client = Client::shared(&trusting(&s), &Proxies::none()).unwrap();
    assert_eq!(get_hello(&client, &srv.url()).await.unwrap(), (http::Version::HTTP_11, "hi".to_owned()));
    // The same file under another path: the same client, the same kept-alive connection.
    let copy = s.dir.path().join("copy.pem");
    std::fs::copy(&s.ca_file, &copy).unwrap();
    let again =
        Client::shared(&TlsConfig { ca_file: Some(copy), ..TlsConfig::default() }, &Proxies::none()).unwrap();
    assert_eq!(get_hello(&again, &srv.url()).await.unwrap().1, "hi");
    assert_eq!((srv.connections(), srv.requests()), (1, 2));
}

#[tokio::test]
async fn an_untrusted_certificate_is_refused_clearly_and_never_retried() {
    let s = setup();
    let srv = server(&s, &["127.0.0.1"], Validity::Current, false).await;
    let client = Client::shared(&TlsConfig::default(), &Proxies::none()).unwrap();
    let (class, attempts, message) = through_pipeline(&client, &srv.url()).await;
    assert_eq!((class, attempts), (ErrorClass::InvalidRequest, 1), "{message}");
    assert!(message.contains(&format!("the certificate for {} is not trusted", srv.addr)), "{message}");
    assert!(message.contains("add its CA to this target as `ca_file`"), "{message}");
    assert_eq!((srv.connections(), srv.requests()), (1, 0), "one handshake, no request");
}

#[tokio::test]
async fn an_expired_certificate_is_classified_and_not_retried() {
    let s = setup();
    let srv = server(&s, &["127.0.0.1"], Validity::Expired, false).await;
    let client = Client::shared(&trusting(&s), &Proxies::none()).unwrap();
    let (class, attempts, message) = through_pipeline(&client, &srv.url()).await;
    assert_eq!((class, attempts), (ErrorClass::InvalidRequest, 1), "{message}");
    assert!(message.contains("has expired"), "{message}");
    assert_eq!((srv.connections(), srv.requests()), (1, 0));
}

#[tokio::test]
async fn a_certificate_for_another_name_is_classified_and_not_retried() {
    let s = setup();
    let srv = server(&s, &["models.keel.invalid"], Validity::Current, false).await;
    let client = Client::shared(&trusting(&s), &Proxies::none()).unwrap();
    let (class, attempts, message) = through_pipeline(&client, &srv.url()).await;
    assert_eq!((class, attempts), (ErrorClass::InvalidRequest, 1), "{message}");
    assert!(message.contains("is not valid for that name"), "{message}");
    assert_eq!((srv.connections(), srv.requests()), (1, 0));
}

#[tokio::test]
async fn a_server_requiring_a_client_certificate_takes_ours_and_refuses_none() {
    let s = setup();
    let clients = TestCa::new("Keel client CA");
    let leaf = s.ca.server_cert(&["127.0.0.1"], Validity::Current);
    let srv = HttpsServer::start(server_config(&leaf, Some(&clients), true), app()).await;
    let (cert, key) = clients.client_cert("agent-1").write(s.dir.path(), "agent");
    let mutual = TlsConfig { client_cert_file: Some(cert), client_key_file: Some(key), ..trusting(&s) };
    let client = Client::shared(&mutual, &Proxies::none()).unwrap();
    assert_eq!(get_hello(&client, &srv.url()).await.unwrap().1, "hi");

    let without = Client::shared(&trusting(&s), &Proxies::none()).unwrap();
    let (class, attempts, message) = through_pipeline(&without, &srv.url()).await;
    assert_eq!((class, attempts), (ErrorClass::InvalidRequest, 1), "{message}");
    assert!(message.contains("client certificate") && message.contains("`client_cert_file`"), "{message}");
    assert_eq!((srv.connections(), srv.requests()), (2, 1), "the refused one made no request");

    // A certificate from a CA the server does not trust is refused as clearly.
    let stranger = TestCa::new("someone else").client_cert("agent-2");
    let (cert, key) = stranger.write(s.dir.path(), "stranger");
    let wrong = TlsConfig { client_cert_file: Some(cert), client_key_file: Some(key), ..trusting(&s) };
    let (class, _, message) =
        through_pipeline(&Client::shared(&wrong, &Proxies::none()).unwrap(), &srv.url()).await;
    assert_eq!(class, ErrorClass::InvalidRequest, "{message}");
    assert!(message.contains("refused the client certificate"), "{message}");
}

#[tokio::test]
async fn http2_is_negotiated_when_the_server_offers_it() {
    let s = setup();
    let client = Client::shared(&trusting(&s), &Proxies::none()).unwrap();
    let h2 = server(&s, &["127.0.0.1"], Validity::Current, true).await;
    assert_eq!(get_hello(&client, &h2.url()).await.unwrap().0, http::Version::HTTP_2);
    assert_eq!(h2.versions(), [http::Version::HTTP_2]);
    let h1 = server(&s, &["127.0.0.1"], Validity::Current, false).await;
    assert_eq!(get_hello(&client, &h1.url()).await.unwrap().0, http::Version::HTTP_11);
    assert_eq!(h1.versions(), [http::Version::HTTP_11]);
}

#[tokio::test]
async fn https_goes_through_a_connect_proxy_and_loopback_goes_direct() {
    let s = setup();
    // `models.test` resolves nowhere: only the proxy (which takes every host to mean
    // 127.0.0.1) can reach it, so a call that bypassed the proxy would fail.
    let srv = server(&s, &["models.test", "127.0.0.1"], Validity::Current, true).await;
    let proxy = ConnectProxy::start().await;
    let via = Client::shared(&trusting(&s), &Proxies::new("", &proxy.url(), "")).unwrap();
    let (version, body) = get_hello(&via, &srv.url_as("models.test")).await.unwrap();
    assert_eq!((version, body.as_str()), (http::Version::HTTP_2, "hi"));
    assert_eq!(proxy.seen(), [format!("CONNECT models.test:{} HTTP/1.1", srv.addr.port())]);

    // A loopback destination never goes through a proxy (it could not reach it).
    assert_eq!(get_hello(&via, &srv.url()).await.unwrap().1, "hi");
    assert_eq!(proxy.seen().len(), 1, "127.0.0.1 went direct");
    assert_eq!(srv.connections(), 2);

    // The certificate is still checked end to end through the tunnel.
    let untrusting = Client::shared(&TlsConfig::default(), &Proxies::new("", &proxy.url(), "")).unwrap();
    let (class, attempts, message) = through_pipeline(&untrusting, &srv.url_as("models.test")).await;
    assert_eq!((class, attempts), (ErrorClass::InvalidRequest, 1), "{message}");
    assert!(message.contains("the certificate for models.test:"), "{message}");
}

#[tokio::test]
async fn a_proxy_wanting_credentials_gets_those_of_its_url_and_a_407_is_not_retried() {
    let s = setup();
    let srv = server(&s, &["models.test"], Validity::Current, false).await;
    let proxy = ConnectProxy::start_with_credentials("keel", "s3cr:t").await;
    let with =
        Client::shared(&trusting(&s), &Proxies::new("", &proxy.url_with("keel", "s3cr%3At"), "")).unwrap();
    assert_eq!(get_hello(&with, &srv.url_as("models.test")).await.unwrap().1, "hi");

    let without = Client::shared(&trusting(&s), &Proxies::new("", &proxy.url(), "")).unwrap();
    let (class, attempts, message) = through_pipeline(&without, &srv.url_as("models.test")).await;
    assert_eq!((class, attempts), (ErrorClass::Unauthorized, 1), "{message}");
    assert!(message.contains("407") && message.contains("HTTPS_PROXY=http://user:password@"), "{message}");
    assert_eq!(proxy.seen().len(), 2);

    // Plain http through it: the credentials go in each proxied request.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app()).await.unwrap() });
    let plain =
        Client::shared(&TlsConfig::default(), &Proxies::new(&proxy.url_with("keel", "s3cr%3At"), "", ""))
            .unwrap();
    let base = format!("http://plain.test:{}", addr.port());
    assert_eq!(get_hello(&plain, &base).await.unwrap().1, "hi");
    assert_eq!(proxy.seen().len(), 3);
}

#[tokio::test]
async fn plain_http_goes_to_the_http_proxy_in_absolute_form() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app()).await.unwrap() });
    let proxy = ConnectProxy::start().await;
    let client = Client::shared(&TlsConfig::default(), &Proxies::new(&proxy.url(), "", "")).unwrap();
    let base = format!("http://plain.test:{}", addr.port());
    assert_eq!(get_hello(&client, &base).await.unwrap().1, "hi");
    assert_eq!(proxy.seen(), [format!("GET {base}/hello HTTP/1.1")]);
    // Direct to loopback, without the proxy's credentials or the absolute form.
    assert_eq!(get_hello(&client, &format!("http://{addr}")).await.unwrap().1, "hi");
    assert_eq!(proxy.seen().len(), 1);
}

#[tokio::test]
async fn a_proxy_that_cannot_be_reached_is_a_network_failure_worth_retrying() {
    let s = setup();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let client = Client::shared(&trusting(&s), &Proxies::new("", &url, "")).unwrap();
    let (class, attempts, message) = through_pipeline(&client, "https://127.0.0.1:1").await;
    assert_eq!(class, ErrorClass::Network, "{message}");
    assert!(attempts > 1, "retried: {attempts}");
}

#[tokio::test]
async fn https_to_a_plain_http_port_says_the_scheme_is_wrong() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app()).await.unwrap() });
    let client = Client::shared(&TlsConfig::default(), &Proxies::none()).unwrap();
    let (class, attempts, message) = through_pipeline(&client, &format!("https://{addr}")).await;
    assert_eq!((class, attempts), (ErrorClass::InvalidRequest, 1), "{message}");
    assert!(message.contains("does not speak TLS"), "{message}");
}

#[tokio::test]
async fn a_refused_connection_is_network_and_retried() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", dead.local_addr().unwrap());
    drop(dead);
    let client = Client::shared(&TlsConfig::default(), &Proxies::none()).unwrap();
    let (class, attempts, message) = through_pipeline(&client, &url).await;
    assert_eq!(class, ErrorClass::Network, "{message}");
    assert!(attempts > 1, "retried: {attempts}");
    assert!(message.contains("cannot connect to 127.0.0.1"), "{message}");
}

#[test]
fn bad_pem_files_are_named_by_key() {
    let s = setup();
    let write = |name: &str, text: &str| {
        let p = s.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let problems = |tls: TlsConfig| -> Vec<String> {
        Client::shared(&tls, &Proxies::none()).unwrap_err().iter().map(ToString::to_string).collect()
    };
    let junk = write("junk.pem", "hello\n");
    let broken = write("broken.pem", "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n");
    let missing = s.dir.path().join("missing.pem");

    let p = problems(TlsConfig { ca_file: Some(junk.clone()), ..TlsConfig::default() });
    assert!(
        p.len() == 1 && p[0].starts_with("ca_file: `") && p[0].contains("no `BEGIN CERTIFICATE`"),
        "{p:?}"
    );
    let p = problems(TlsConfig { ca_file: Some(broken), ..TlsConfig::default() });
    assert!(p.len() == 1 && p[0].starts_with("ca_file: ") && p[0].contains("not valid PEM"), "{p:?}");
    let p = problems(TlsConfig { ca_file: Some(missing.clone()), ..TlsConfig::default() });
    assert!(p.len() == 1 && p[0].contains("cannot read") && p[0].contains("missing.pem"), "{p:?}");
    let p = problems(TlsConfig { ca_file: Some(s.dir.path().to_owned()), ..TlsConfig::default() });
    assert!(p.len() == 1 && p[0].contains("not a regular file"), "a directory: {p:?}");
    let p = problems(TlsConfig { ca_file: Some("/dev/zero".into()), ..TlsConfig::default() });
    assert!(p.len() == 1 && p[0].contains("not a regular file"), "a device: {p:?}");
    let fifo = s.dir.path().join("fifo.pem");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let p = problems(TlsConfig { ca_file: Some(fifo), ..TlsConfig::default() });
    assert!(p.len() == 1 && p[0].contains("not a regular file"), "a FIFO, never opened: {p:?}");
    let huge = s.dir.path().join("huge.pem");
    std::fs::File::create(&huge).unwrap().set_len(5 << 20).unwrap();
    let p = problems(TlsConfig { ca_file: Some(huge), ..TlsConfig::default() });
    assert!(p.len() == 1 && p[0].contains("larger than 4 MiB"), "{p:?}");

    // A certificate without its key, a key without its certificate: both named.
    let (cert, key) = s.ca.client_cert("a").write(s.dir.path(), "a");
    let p = problems(TlsConfig { client_cert_file: Some(cert.clone()), ..TlsConfig::default() });
    assert!(p[0].starts_with("client_cert_file: ") && p[0].contains("client_key_file"), "{p:?}");
    let p = problems(TlsConfig { client_key_file: Some(key.clone()), ..TlsConfig::default() });
    assert!(p[0].starts_with("client_key_file: ") && p[0].contains("client_cert_file"), "{p:?}");
    // The key of another certificate, a certificate file given as the key.
    let (_, other_key) = s.ca.client_cert("b").write(s.dir.path(), "b");
    let p = problems(TlsConfig {
        client_cert_file: Some(cert.clone()),
        client_key_file: Some(other_key),
        ..TlsConfig::default()
    });
    assert!(p.len() == 1 && p[0].starts_with("client_key_file: "), "{p:?}");
    let p = problems(TlsConfig {
        client_cert_file: Some(cert.clone()),
        client_key_file: Some(cert),
        ..TlsConfig::default()
    });
    assert!(p.len() == 1 && p[0].starts_with("client_key_file: ") && p[0].contains("private key"), "{p:?}");
    // Every problem at once.
    let p =
        problems(TlsConfig { ca_file: Some(missing), client_cert_file: None, client_key_file: Some(junk) });
    assert_eq!(p.len(), 2, "{p:?}");
}
