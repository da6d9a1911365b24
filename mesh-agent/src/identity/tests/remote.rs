//! The manager in remote mode: two node agents get their certificates from
//! the cluster CA and complete mTLS with them; nothing on the data path
//! waits for the CA; renewal goes through the CA and survives its failures.

use rustls::pki_types::ServerName;
use tokio::io::DuplexStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::{
    cluster_ca::{Cluster, within},
    *,
};

/// Both sides of one handshake over an in-memory pipe.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> (
    std::io::Result<server::TlsStream<DuplexStream>>,
    std::io::Result<client::TlsStream<DuplexStream>>,
) {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from("hbone.mesh.invalid").unwrap();
    tokio::join!(
        TlsAcceptor::from(server).accept(s),
        TlsConnector::from(client).connect(name, c)
    )
}

#[tokio::test]
async fn agents_on_two_nodes_complete_mtls_with_ca_issued_certificates() {
    within(async {
        let c = Cluster::start(Duration::from_secs(3600)).await;
        c.pod("default", "web-1", "web", "node-a", "Running");
        c.pod("prod", "db-1", "db", "node-b", "Running");
        let node_a = c.manager(&c.agent_token("node-a"));
        let node_b = c.manager(&c.agent_token("node-b"));
        let (web, db) = (id("default", "web"), id("prod", "db"));

        // Not prepared: the data path gets an error at once, no request.
        let requests = c.fake.requests().len();
        let err = node_a.client_config(&web, &db).unwrap_err();
        assert!(
            matches!(&err, IdentityError::NotReady(i) if **i == web),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("no certificate yet for spiffe://cluster.local/ns/default/sa/web"),
            "{err}"
        );
        assert!(node_b.server_config(&db).is_err());
        assert!(node_a.certificate(&web).is_err());
        assert_eq!(c.fake.requests().len(), requests);

        node_a.prepare(&web).await.unwrap();
        node_b.prepare(&db).await.unwrap();
        // Node A may not hold node B's identity.
        let err = node_a.prepare(&db).await.unwrap_err();
        assert!(
            err.to_string().contains("runs on node node-a")
                && err.to_string().contains(&c.address()),
            "{err}"
        );

        let (s, cl) = handshake(
            node_b.server_config(&db).unwrap(),
            node_a.client_config(&web, &db).unwrap(),
        )
        .await;
        let (s, cl) = (s.unwrap(), cl.unwrap());
        assert_eq!(peer_identity(s.get_ref().1, TD), Some(web.clone()));
        assert_eq!(peer_identity(cl.get_ref().1, TD), Some(db.clone()));

        // The root is the --ca-root file's; the certificate is the CA's.
        let dump = node_a.dump();
        let root = der_of_pem(c.ca.root_pem());
        assert_eq!(dump[0].role, "root");
        assert_eq!(dump[0].serial, leaf_serial(&root));
        assert_eq!(node_a.root_pem(), c.ca.root_pem());
        assert_eq!(dump[1].identity, web.to_string());
        let cert = node_a.certificate(&web).unwrap();
        assert_eq!(dump[1].serial, cert.serial);
        verify_chain(&cert.chain[0], &root).unwrap();
        // Signing is the CA's job.
        let now = SystemTime::now();
        assert!(
            node_a
                .issue(&web, now, now + Duration::from_secs(60))
                .is_err()
        );
        assert_eq!(c.count("issued").await, 2);
        assert_eq!(c.count("forbidden").await, 1);
    })
    .await
}

#[tokio::test]
async fn concurrent_prepares_make_one_request() {
    within(async {
        let c = Cluster::start(Duration::from_secs(3600)).await;
        c.pod("default", "web-1", "web", "node-a", "Running");
        let m = c.manager(&c.agent_token("node-a"));
        let web = id("default", "web");
        let all = futures::future::join_all((0..5).map(|_| m.prepare(&web))).await;
        assert!(all.iter().all(Result::is_ok), "{all:?}");
        assert_eq!(c.count("issued").await, 1);
        // Prepared already: nothing more is asked.
        m.prepare(&web).await.unwrap();
        assert_eq!(c.count("issued").await, 1);
        let foreign = Identity::new("other.domain", "default", "web");
        assert!(matches!(
            m.prepare(&foreign).await,
            Err(IdentityError::ForeignTrustDomain { .. })
        ));
    })
    .await
}

#[tokio::test]
async fn renewal_goes_through_the_ca_and_keeps_the_old_certificate_on_failure() {
    within(async {
        let c = Cluster::start(Duration::from_secs(2)).await;
        c.pod("default", "web-1", "web", "node-a", "Running");
        let m = c.manager(&c.agent_token("node-a"));
        let web = id("default", "web");
        m.prepare(&web).await.unwrap();
        let server = m.server_config(&web).unwrap();
        let first = m.certificate(&web).unwrap().serial.clone();

        // Every API request fails: TokenReview cannot run, the CA answers 500.
        c.fake.fail_next(usize::MAX, 500);
        let rotation = m.spawn_rotation();
        tokio::time::sleep(Duration::from_millis(1600)).await;
        assert_eq!(m.certificate(&web).unwrap().serial, first);
        assert!(c.count("error").await >= 1);

        // The CA is back: the retry renews, the same config presents it.
        c.fake.fail_next(0, 500);
        let renewed = loop {
            let serial = m.certificate(&web).unwrap().serial.clone();
            if serial != first {
                break serial;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        rotation.abort();
        // The config made before the renewal presents the new certificate.
        let (s, cl) = handshake(server, m.client_config(&web, &web).unwrap()).await;
        s.unwrap();
        let cl = cl.unwrap();
        let cc = cl.get_ref().1;
        assert_eq!(leaf_serial(&cc.peer_certificates().unwrap()[0]), renewed);
    })
    .await
}

#[tokio::test]
async fn embedded_prepare_issues_off_the_async_workers() {
    within(async {
        let m = manager(&TempDir::new("prepare"), Duration::from_secs(3600));
        let web = id("default", "web");
        m.prepare(&web).await.unwrap();
        let serial = m.certificate(&web).unwrap().serial.clone();
        m.prepare(&web).await.unwrap();
        assert_eq!(m.certificate(&web).unwrap().serial, serial);
        assert_eq!(m.dump().len(), 2);
    })
    .await
}

#[tokio::test]
async fn identities_without_a_certificate_are_fetched_in_the_background() {
    within(async {
        let c = Cluster::start(Duration::from_secs(3600)).await;
        let m = c.manager(&c.agent_token("node-a"));
        let rotation = m.spawn_rotation();
        let (web, db) = (id("default", "web"), id("prod", "db"));
        let ready = |id: &Identity| {
            let m = m.clone();
            let id = id.clone();
            async move {
                while m.server_config(&id).is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };

        // Enrolled before the API server shows its pod on this node.
        let err = m.prepare(&web).await.unwrap_err();
        assert!(err.to_string().contains("no pod with identity"), "{err}");
        assert!(matches!(
            m.server_config(&web),
            Err(IdentityError::NotReady(_))
        ));
        c.pod("default", "web-1", "web", "node-a", "Running");
        ready(&web).await;

        // Asked for by the data path only.
        c.pod("prod", "db-1", "db", "node-a", "Running");
        assert!(matches!(
            m.client_config(&db, &web),
            Err(IdentityError::NotReady(_))
        ));
        ready(&db).await;
        rotation.abort();
        assert_eq!(c.count("issued").await, 2);
        assert_eq!(c.count("forbidden").await, 1);
    })
    .await
}
