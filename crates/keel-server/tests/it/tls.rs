//! `keel serve` on TLS (`[server] tls = { cert_file, key_file }`): HTTPS with a
//! certificate of a CA made for the test, plain HTTP and silent clients refused
//! without harm to the others, and files that cannot serve refused at config time by
//! key.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use keel_examples::payments::Faults;
use keel_testkit::tls::{TestCa, Validity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{AGENT, Server};

async fn get(client: &keel_http::Client, url: &str, key: Option<&str>) -> (u16, String) {
    let mut req = http::Request::get(url);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let resp = client.send(req.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let uri: http::Uri = url.parse().unwrap();
    let body = keel_http::read_body(resp.into_body(), 1 << 20, &uri).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_serve_answers_https_and_refuses_plain_http_and_silent_clients() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new("keel test ca");
    let ca_file = ca.write(certs.path(), "ca.pem");
    let (cert, key) = ca.server_cert(&["127.0.0.1"], Validity::Current).write(certs.path(), "server");
    let line = format!(
        "header_read_timeout = \"300ms\"\ntls = {{ cert_file = \"{}\", key_file = \"{}\" }}",
        cert.display(),
        key.display()
    );
    let mut server = Server::start_server(Faults::default(), &line, "").await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let https = format!("https://{addr}");

    let tls = keel_http::TlsConfig { ca_file: Some(ca_file), ..keel_http::TlsConfig::default() };
    let client = keel_http::Client::shared(&tls, &keel_http::Proxies::none()).unwrap();
    assert_eq!(get(&client, &format!("{https}/healthz"), None).await.0, 200);
    let (status, body) = get(&client, &format!("{https}/api/runs"), Some(AGENT)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(get(&client, &format!("{https}/api/runs"), None).await.0, 401, "keys as on plain HTTP");

    // Plain HTTP to the TLS port: no answer in HTTP, the connection closed.
    let mut plain = tokio::net::TcpStream::connect(&addr).await.unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nhost: keel\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the server closes it");
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"), "no plain answer: {answer:?}");

    // A client that opens a connection and never says hello is closed after the
    // header timeout, not held.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "closed: {n:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "bounded by the header timeout");

    // The others were not harmed.
    assert_eq!(get(&client, &format!("{https}/healthz"), None).await.0, 200);

    // A client that does not trust the CA is refused by the handshake, classified.
    let untrusting =
        keel_http::Client::shared(&keel_http::TlsConfig::default(), &keel_http::Proxies::none()).unwrap();
    let refused = untrusting
        .send(http::Request::get(format!("{https}/healthz")).body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap_err();
    assert_eq!(refused.class, keel_core::ErrorClass::InvalidRequest, "{refused:?}");
    server.shutdown().await;
}

#[test]
fn tls_files_that_cannot_serve_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("keel test ca");
    let (cert, _key) = ca.server_cert(&["127.0.0.1"], Validity::Current).write(dir.path(), "one");
    let (_other_cert, other_key) = ca.server_cert(&["127.0.0.1"], Validity::Current).write(dir.path(), "two");
    let parse = |tls: &str| {
        let text = format!("[server]\ntls = {tls}\n");
        keel_runtime::Config::parse(&text, &dir.path().join("keel.toml"), &|_| None)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let missing = parse("{ cert_file = \"nowhere.pem\", key_file = \"nowhere.key\" }");
    assert!(missing.contains("server.tls.cert_file") && missing.contains("server.tls.key_file"), "{missing}");
    assert!(missing.contains("keel.toml:2:"), "by line: {missing}");
    let mismatched =
        parse(&format!("{{ cert_file = \"{}\", key_file = \"{}\" }}", cert.display(), other_key.display()));
    assert!(mismatched.contains("server.tls.key_file"), "{mismatched}");
    let not_pem =
        parse(&format!("{{ cert_file = \"{}\", key_file = \"{}\" }}", other_key.display(), cert.display()));
    assert!(not_pem.contains("server.tls.cert_file") && not_pem.contains("BEGIN CERTIFICATE"), "{not_pem}");
    let unknown = parse("{ cert = \"a\", key = \"b\" }");
    assert!(unknown.contains("cert"), "{unknown}");
}
