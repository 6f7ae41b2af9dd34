//! The agent's `clusterset.local` DNS server answering real UDP queries on loopback:
//! A (VIP), headless (backend addresses), SRV for named ports, NODATA/NXDOMAIN, REFUSED
//! outside the zone without an upstream, relay to an upstream when one is configured (a
//! socket this test binds on loopback).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use clustermesh_agent::dns::{self, Zone};
use clustermesh_agent::services::{Affinity, LocalService, Name, ServiceMerger};
use clustermesh_types::model::{
    ClusterService, L4Addr, PortConfiguration, ServiceExport, ServiceExportPort,
};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name as DnsName, RData, RecordType};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn ports(port: u16) -> PortConfiguration {
    [(
        "http".to_string(),
        L4Addr {
            protocol: "TCP".into(),
            port,
        },
    )]
    .into_iter()
    .collect()
}

fn cs(cluster: &str, id: u32, name: &str, vip: Option<&str>, backends: &[&str]) -> ClusterService {
    ClusterService {
        cluster: cluster.into(),
        namespace: "default".into(),
        name: name.into(),
        frontends: vip
            .map(|v| (v.to_string(), ports(80)))
            .into_iter()
            .collect(),
        backends: backends
            .iter()
            .map(|b| (b.to_string(), ports(8080)))
            .collect(),
        include_external: true,
        shared: true,
        cluster_id: id,
        ..Default::default()
    }
}

fn export(cluster: &str, name: &str, type_: &str) -> Arc<ServiceExport> {
    Arc::new(ServiceExport {
        cluster: cluster.into(),
        name: name.into(),
        namespace: "default".into(),
        export_creation_timestamp: "2026-01-01T00:00:00Z".into(),
        ports: vec![ServiceExportPort {
            name: "http".into(),
            protocol: "TCP".into(),
            app_protocol: None,
            port: 80,
        }],
        type_: type_.into(),
        ..Default::default()
    })
}

fn zone() -> Zone {
    let mut s = ServiceMerger::new("c1");
    let echo = Name::new("default", "echo");
    s.on_local(
        echo.clone(),
        Some(LocalService {
            service: cs("c1", 1, "echo", Some("172.20.0.10"), &["10.1.1.10"]),
            affinity: Affinity::None,
            ..Default::default()
        }),
    );
    s.on_remote(
        "c2",
        echo.clone(),
        Some(Arc::new(cs(
            "c2",
            2,
            "echo",
            Some("172.20.1.10"),
            &["10.2.1.10"],
        ))),
    );
    s.on_export(
        "c1",
        echo.clone(),
        Some(export("c1", "echo", "ClusterSetIP")),
    );
    // Headless, exported by c2 only.
    let db = Name::new("default", "db");
    s.on_remote(
        "c2",
        db.clone(),
        Some(Arc::new(cs(
            "c2",
            2,
            "db",
            None,
            &["10.2.1.20", "10.2.1.21"],
        ))),
    );
    s.on_export("c2", db, Some(export("c2", "db", "Headless")));
    Zone::build(&s)
}

async fn server(config: dns::Config) -> (SocketAddr, CancellationToken) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let (_tx, rx) = watch::channel(Arc::new(zone()));
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let _keep = _tx;
        dns::serve(sock, rx, config, t).await
    });
    (addr, token)
}

async fn ask(server: SocketAddr, name: &str, ty: RecordType) -> Message {
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(DnsName::from_ascii(name).unwrap(), ty));
    client.send_to(&q.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), client.recv_from(&mut buf))
        .await
        .expect("answer")
        .unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.id, q.metadata.id);
    m
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn answers_the_zone_over_udp() {
    let (srv, token) = server(dns::Config::default()).await;

    let m = ask(srv, "echo.default.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(
        addrs(&m),
        vec!["172.20.0.10".parse::<IpAddr>().unwrap()],
        "the local VIP"
    );

    let m = ask(srv, "ECHO.default.svc.clusterset.local.", RecordType::AAAA).await;
    assert_eq!(
        (m.metadata.response_code, m.answers.len()),
        (ResponseCode::NoError, 0),
        "NODATA"
    );

    let m = ask(srv, "db.default.svc.clusterset.local.", RecordType::A).await;
    let mut got = addrs(&m);
    got.sort();
    assert_eq!(
        got,
        vec![
            "10.2.1.20".parse::<IpAddr>().unwrap(),
            "10.2.1.21".parse().unwrap()
        ],
        "headless: backends"
    );

    let m = ask(
        srv,
        "_http._tcp.echo.default.svc.clusterset.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    match &m.answers[0].data {
        RData::SRV(s) => {
            assert_eq!(s.port, 80);
            assert_eq!(s.target.to_ascii(), "echo.default.svc.clusterset.local.");
        }
        other => panic!("not SRV: {other:?}"),
    }
    assert_eq!(m.additionals.len(), 1, "the target's A record");

    let m = ask(srv, "nope.default.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let m = ask(
        srv,
        "_grpc._tcp.echo.default.svc.clusterset.local.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let m = ask(srv, "default.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NoError,
        "empty non-terminal"
    );

    // Outside the zone, no upstream: REFUSED (nothing is sent anywhere).
    let m = ask(srv, "example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    token.cancel();
}

#[tokio::test]
async fn forwards_outside_the_zone_to_the_upstream() {
    // A fake upstream on loopback that answers every query with one A record.
    let up = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = up.recv_from(&mut buf).await {
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut r = Message::response(q.metadata.id, q.metadata.op_code);
            r.queries = q.queries.clone();
            r.add_answer(hickory_proto::rr::Record::from_rdata(
                q.queries[0].name.clone(),
                30,
                RData::A(hickory_proto::rr::rdata::A("192.0.2.7".parse().unwrap())),
            ));
            up.send_to(&r.to_vec().unwrap(), peer).await.unwrap();
        }
    });
    let (srv, token) = server(dns::Config {
        upstream: Some(up_addr),
        ..Default::default()
    })
    .await;
    let m = ask(srv, "example.com.", RecordType::A).await;
    assert_eq!(addrs(&m), vec!["192.0.2.7".parse::<IpAddr>().unwrap()]);
    // The zone is still answered locally.
    let m = ask(srv, "echo.default.svc.clusterset.local.", RecordType::A).await;
    assert_eq!(addrs(&m), vec!["172.20.0.10".parse::<IpAddr>().unwrap()]);
    token.cancel();
}
