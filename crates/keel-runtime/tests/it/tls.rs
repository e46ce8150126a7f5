//! http tools over TLS (issue 14): `ca_file` for an internal CA, a clear refusal
//! without it, `HTTPS_PROXY` and `NO_PROXY` from the environment the config is read in.

use axum::Json;
use axum::Router;
use axum::extract::Path as UrlPath;
use axum::routing::post;
use keel_core::{ErrorClass, TokioClock};
use keel_runtime::Config;
use keel_testkit::tls::{ConnectProxy, HttpsServer, TestCa, Validity, server_config};
use serde_json::{Value, json};

async fn charge(UrlPath(order): UrlPath<String>, Json(body): Json<Value>) -> Json<Value> {
    Json(json!({"order": order, "charged": body["amount"]}))
}

async fn payments(ca: &TestCa) -> HttpsServer {
    let leaf = ca.server_cert(&["127.0.0.1"], Validity::Current);
    let app = Router::new().route("/charge/{order}", post(charge));
    HttpsServer::start(server_config(&leaf, None, true), app).await
}

fn tool_config(base: &str, extra: &str) -> String {
    format!("[tools.charge]\nkind = \"http\"\nurl = \"{base}/charge/{{{{order}}}}\"\n{extra}\n")
}

#[tokio::test]
async fn an_https_tool_trusting_its_ca_file_is_called_and_one_without_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("payments CA");
    ca.write(dir.path(), "payments-ca.pem");
    let server = payments(&ca).await;
    let file = dir.path().join("keel.toml");
    // A relative `ca_file` is keel.toml's directory's.
    let text = tool_config(&server.url(), "ca_file = \"payments-ca.pem\"");
    let config = Config::parse(&text, &file, &|_| None).unwrap();
    let out = config.tools["charge"].invoke(&json!({"order": "a-1", "amount": 12}), &TokioClock::new()).await;
    assert_eq!(out.unwrap(), json!({"status": 200, "body": {"order": "a-1", "charged": 12}}));

    let config = Config::parse(&tool_config(&server.url(), ""), &file, &|_| None).unwrap();
    let e = config.tools["charge"].invoke(&json!({"order": "a-2", "amount": 1}), &TokioClock::new()).await;
    let e = e.unwrap_err();
    assert_eq!(e.class, ErrorClass::InvalidRequest, "{e}");
    assert!(e.message.contains("is not trusted") && e.message.contains("`ca_file`"), "{e}");
    assert_eq!((server.connections(), server.requests()), (2, 1), "the refused call sent nothing");
}

#[tokio::test]
async fn https_proxy_and_no_proxy_come_from_the_environment_the_config_is_read_in() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("payments CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let leaf = ca.server_cert(&["payments.test"], Validity::Current);
    let app = Router::new().route("/charge/{order}", post(charge));
    let server = HttpsServer::start(server_config(&leaf, None, true), app).await;
    let proxy = ConnectProxy::start().await;
    // `payments.test` resolves nowhere: only the proxy reaches it.
    let text = tool_config(&server.url_as("payments.test"), &format!("ca_file = \"{}\"", ca_file.display()));
    let file = dir.path().join("keel.toml");
    let proxy_url = proxy.url();
    let env = move |name: &str| (name == "https_proxy").then(|| proxy_url.clone());
    let via = Config::parse(&text, &file, &env).unwrap();
    assert!(via.proxies.is_set());
    let params = json!({"order": "b-1", "amount": 3});
    let out = via.tools["charge"].invoke(&params, &TokioClock::new()).await.unwrap();
    assert_eq!(out["body"]["charged"], 3);
    assert_eq!(proxy.seen(), [format!("CONNECT payments.test:{} HTTP/1.1", server.addr.port())]);
    // Read from the environment given, not the process's: without it, no proxy; and
    // `NO_PROXY` is read alongside (its matching is keel-http's, tested there).
    assert!(!Config::parse(&text, &file, &|_| None).unwrap().proxies.is_set());
    let proxy_url = proxy.url();
    let with_no_proxy = move |name: &str| match name {
        "HTTPS_PROXY" => Some(proxy_url.clone()),
        "NO_PROXY" => Some("payments.test".to_owned()),
        _ => None,
    };
    let c = Config::parse(&text, &file, &with_no_proxy).unwrap();
    assert!(format!("{:?}", c.proxies).contains("no_proxy: \"payments.test\""), "{:?}", c.proxies);
}

#[tokio::test]
async fn an_https_tool_shows_its_client_certificate_when_the_server_requires_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("payments CA");
    let clients = TestCa::new("tools CA");
    ca.write(dir.path(), "ca.pem");
    clients.client_cert("keel").write(dir.path(), "keel");
    let leaf = ca.server_cert(&["127.0.0.1"], Validity::Current);
    let app = Router::new().route("/charge/{order}", post(charge));
    let server = HttpsServer::start(server_config(&leaf, Some(&clients), false), app).await;
    let file = dir.path().join("keel.toml");
    let mutual = "ca_file = \"ca.pem\"\nclient_cert_file = \"keel.pem\"\nclient_key_file = \"keel.key\"";
    let config = Config::parse(&tool_config(&server.url(), mutual), &file, &|_| None).unwrap();
    let params = json!({"order": "c-1", "amount": 5});
    let out = config.tools["charge"].invoke(&params, &TokioClock::new()).await.unwrap();
    assert_eq!(out["body"]["charged"], 5);
    let config =
        Config::parse(&tool_config(&server.url(), "ca_file = \"ca.pem\""), &file, &|_| None).unwrap();
    let e = config.tools["charge"].invoke(&params, &TokioClock::new()).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::InvalidRequest, "{e}");
    assert!(e.message.contains("`client_cert_file`"), "{e}");
    assert_eq!(server.requests(), 1);
}
