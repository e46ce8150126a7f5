//! Upstreams over TLS (issue 14): a fake provider behind a CA made in the test.

use keel_testkit::tls::{TestCa, Validity, server_config};

use crate::support::{Fake, ask, ask_stream, model, post_chat, serve};

#[tokio::test]
async fn a_chat_completion_reaches_an_https_upstream_trusted_by_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("internal models CA");
    let leaf = ca.server_cert(&["127.0.0.1"], Validity::Current);
    let (fake, server) = Fake::start_tls(server_config(&leaf, None, true)).await;
    let mut m = model(&fake, "m");
    m.ca_file = Some(ca.write(dir.path(), "ca.pem"));
    let served = serve(vec![("gpt", m)]).await;

    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["choices"][0]["message"]["content"], "Hello world");
    // Streams too, over the same HTTP/2 connection.
    let s = post_chat(&served.url, ask_stream("gpt"), &[]).await;
    assert_eq!((s.status, s.streamed_text()), (200, "Hello world".to_owned()), "{}", s.text);
    assert_eq!(fake.hits(), 2);
    assert_eq!(server.versions(), [http::Version::HTTP_2, http::Version::HTTP_2]);
    assert_eq!(server.connections(), 1, "one pooled connection");
}

#[tokio::test]
async fn an_untrusted_upstream_is_refused_with_the_fix_and_never_retried() {
    let ca = TestCa::new("internal models CA");
    let leaf = ca.server_cert(&["127.0.0.1"], Validity::Current);
    let (fake, server) = Fake::start_tls(server_config(&leaf, None, false)).await;
    let served = serve(vec![("gpt", model(&fake, "m"))]).await;

    for body in [ask("gpt"), ask_stream("gpt")] {
        let a = post_chat(&served.url, body, &[]).await;
        assert_eq!(a.status, 400, "{}", a.text);
        assert_eq!((a.header("x-keel-error-class"), a.header("x-keel-attempts")), ("invalid_request", "1"));
        let message = a.json()["error"]["message"].as_str().unwrap_or_default().to_owned();
        assert!(
            message.contains(&format!("the certificate for {} is not trusted", server.addr))
                && message.contains("`ca_file`"),
            "{message}"
        );
    }
    assert_eq!((server.connections(), server.requests(), fake.hits()), (2, 0, 0), "one attempt per call");
}

#[tokio::test]
async fn an_expired_upstream_certificate_is_classified_and_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("internal models CA");
    let leaf = ca.server_cert(&["127.0.0.1"], Validity::Expired);
    let (fake, server) = Fake::start_tls(server_config(&leaf, None, false)).await;
    let mut m = model(&fake, "m");
    m.ca_file = Some(ca.write(dir.path(), "ca.pem"));
    let served = serve(vec![("gpt", m)]).await;
    let a = post_chat(&served.url, ask("gpt"), &[]).await;
    assert_eq!((a.status, a.header("x-keel-attempts")), (400, "1"), "{}", a.text);
    assert!(a.text.contains("has expired"), "{}", a.text);
    assert_eq!(server.connections(), 1);
}

#[tokio::test]
async fn a_model_shows_its_client_certificate_to_an_upstream_that_requires_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("internal models CA");
    let clients = TestCa::new("gateway clients CA");
    let leaf = ca.server_cert(&["127.0.0.1"], Validity::Current);
    let (fake, server) = Fake::start_tls(server_config(&leaf, Some(&clients), true)).await;
    let (cert, key) = clients.client_cert("keel-gateway").write(dir.path(), "keel");
    let mut with = model(&fake, "m");
    with.ca_file = Some(ca.write(dir.path(), "ca.pem"));
    let without = with.clone();
    (with.client_cert_file, with.client_key_file) = (Some(cert), Some(key));
    let served = serve(vec![("mtls", with), ("plain", without)]).await;
    let a = post_chat(&served.url, ask("mtls"), &[]).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = post_chat(&served.url, ask("plain"), &[]).await;
    assert_eq!((a.status, a.header("x-keel-attempts")), (400, "1"), "{}", a.text);
    assert!(a.text.contains("requires a client certificate"), "{}", a.text);
    assert_eq!((server.requests(), fake.hits()), (1, 1));
}

#[test]
fn bad_tls_files_are_config_problems_naming_the_model_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "junk").unwrap();
    let mut m = keel_gateway::ModelConfig::new(keel_gateway::Provider::Openai, "https://127.0.0.1:1/v1", "m");
    m.ca_file = Some(junk);
    m.client_key_file = Some(dir.path().join("absent.key"));
    let models = [("gpt".to_owned(), m)].into_iter().collect();
    let e = keel_gateway::Gateway::builder(models).build().unwrap_err();
    let text = e.to_string();
    assert!(text.contains("models.gpt.ca_file: `"), "{text}");
    assert!(text.contains("models.gpt.client_key_file: cannot read `"), "{text}");
    assert!(text.contains("models.gpt.client_key_file: a private key needs its certificate"), "{text}");
}
