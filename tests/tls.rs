//! wss:// against the real server on both drivers: a generated certificate and key, given as
//! PEM or DER whatever the file extension (`.cer` / `.pvk`, as the Link IoT Edge console names
//! them), and clients that speak only TLS 1.2 or only TLS 1.3 (the official client's TLS library
//! stops at 1.2).

mod support;

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{Connector, MaybeTlsStream};

use support::{Client, Gateway, DRIVERS, THERMO};

struct Cert {
    der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    key_der: Vec<u8>,
}

fn generate() -> Cert {
    let key = rcgen::KeyPair::generate().expect("key pair");
    let params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("params");
    let cert = params.self_signed(&key).expect("self-signed");
    Cert {
        der: cert.der().clone(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        key_der: key.serialize_der(),
    }
}

fn client_config(
    cert: &Cert,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots
        .add(cert.der.clone())
        .expect("trust the test certificate");
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

async fn connect_tls(gw: &Gateway, config: ClientConfig) -> (Client, rustls::ProtocolVersion) {
    let url = format!("wss://localhost:{}//", gw.ws.port());
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "alibaba-iot-linkedge-protocol".parse().expect("header"),
    );
    let tcp = tokio::net::TcpStream::connect(gw.ws)
        .await
        .expect("connect");
    let (ws, _) = tokio_tungstenite::client_async_tls_with_config(
        req,
        tcp,
        None,
        Some(Connector::Rustls(Arc::new(config))),
    )
    .await
    .expect("TLS and WebSocket handshake");
    let version = match ws.get_ref() {
        MaybeTlsStream::Rustls(s) => s.get_ref().1.protocol_version().expect("negotiated"),
        _ => panic!("not a TLS stream"),
    };
    (Client::from_ws(ws), version)
}

#[test]
fn c39_tls_1_2_and_1_3_with_pem_and_der_files() {
    let cert = generate();
    let dir = support::temp_dir("tls");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // PEM files named like the console's, and DER files with the same names.
    let pem = (dir.join("pem-server.cer"), dir.join("pem-server.pvk"));
    std::fs::write(&pem.0, &cert.cert_pem).expect("write");
    std::fs::write(&pem.1, &cert.key_pem).expect("write");
    let der = (dir.join("der-server.cer"), dir.join("der-server.pvk"));
    std::fs::write(&der.0, cert.der.as_ref()).expect("write");
    std::fs::write(&der.1, &cert.key_der).expect("write");
    for (io, files) in [
        (DRIVERS[0], &pem),
        (DRIVERS[1], &der),
        (DRIVERS[0], &der),
        (DRIVERS[1], &pem),
    ] {
        let gw = Gateway::start_with(
            io,
            &[
                "--tls-cert",
                files.0.to_str().expect("utf-8"),
                "--tls-key",
                files.1.to_str().expect("utf-8"),
            ],
            &[],
        );
        assert!(gw.start_line.contains("wss://"), "{}", gw.start_line);
        rt.block_on(async {
            for (versions, expected) in [
                (
                    &[&rustls::version::TLS12][..],
                    rustls::ProtocolVersion::TLSv1_2,
                ),
                (
                    &[&rustls::version::TLS13][..],
                    rustls::ProtocolVersion::TLSv1_3,
                ),
            ] {
                let (mut c, version) = connect_tls(&gw, client_config(&cert, versions)).await;
                assert_eq!(version, expected, "{io}");
                assert_eq!(c.online(THERMO, "thermo-00030").await, 0, "{io}");
                let power = serde_json::json!([{"identifier":"power","type":"bool","value":1}]);
                assert_eq!(c.report(THERMO, "thermo-00030", power).await, 0, "{io}");
                c.close().await;
            }
        });
        // A plain ws:// upgrade sent to the TLS listener fails the TLS handshake: the server
        // answers with at most an alert and closes, and counts the failure.
        let before = gw.metric("ringlink_tls_handshake_errors_total");
        let mut plain = std::net::TcpStream::connect(gw.ws).expect("connect");
        plain
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        std::io::Write::write_all(
            &mut plain,
            b"GET // HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .expect("write");
        let mut answer = Vec::new();
        let _ = std::io::Read::read_to_end(&mut plain, &mut answer);
        assert!(
            !answer.starts_with(b"HTTP/1.1 101"),
            "{io}: no plaintext upgrade on TLS"
        );
        gw.eventually("the failed TLS handshake is counted", || {
            gw.metric("ringlink_tls_handshake_errors_total") >= before + 1.0
        });
    }
}
