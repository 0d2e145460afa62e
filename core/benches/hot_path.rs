//! Micro-benchmarks of the hub's hot path: decoding a publish, and one publish fanned out to
//! N member queues (encode once, then a non-blocking push per member).

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gateway_core::{
    backplane::LocalBackplane,
    hub::{Hub, HubConfig, Publish},
    policy::RoomPolicies,
    protocol::{decode_binary, decode_json, Payload, RoomName},
    session::{Outbound, OutboxReceiver, SessionHandle, TransportKind},
};
use rand::{rngs::StdRng, SeedableRng};

fn decoders(c: &mut Criterion) {
    let json = Bytes::from_static(
        br#"{"type":"publish","room":"lobby","id":42,"data":{"text":"hello there","n":[1,2,3]}}"#,
    );
    let header = br#"{"type":"publish","room":"lobby","id":42}"#;
    let mut bin = (header.len() as u16).to_be_bytes().to_vec();
    bin.extend_from_slice(header);
    bin.extend_from_slice(&[7u8; 100]);
    let bin = Bytes::from(bin);
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("json_publish", |b| b.iter(|| decode_json(&json).unwrap()));
    g.bench_function("binary_publish_100B", |b| {
        b.iter(|| decode_binary(&bin).unwrap())
    });
    g.finish();
}

fn fan_out(c: &mut Criterion) {
    let mut g = c.benchmark_group("publish_fan_out");
    for members in [100usize, 1000, 10_000] {
        let hub = Hub::new(
            HubConfig::new("bench", RoomPolicies::default()),
            Arc::new(LocalBackplane),
            StdRng::seed_from_u64(1),
        );
        let room = RoomName::new("r").unwrap();
        let sessions: Vec<(SessionHandle, OutboxReceiver)> = (0..members)
            .map(|i| {
                let (h, rx) = SessionHandle::new(
                    hub.new_session_id(),
                    TransportKind::WebSocket,
                    "/chat".into(),
                    gateway_core::session::QueueLimits {
                        frames: 1 << 20,
                        bytes: usize::MAX,
                    },
                );
                h.set_user(format!("u{i}").into());
                hub.join(
                    &h,
                    &room,
                    None,
                    Instant::now(),
                    Box::new(|_| Outbound::Ping),
                )
                .expect("no limit on new rooms here");
                (h, rx)
            })
            .collect();
        // Drop the presence events queued by the joins.
        let mut sink = Vec::new();
        for (_, rx) in &sessions {
            rx.try_batch(&mut sink, usize::MAX);
            sink.clear();
        }
        let data = Payload::Binary(Bytes::from(vec![7u8; 100]));
        let publisher: Arc<str> = "publisher".into();
        let message = Publish {
            room: &room,
            from: Some(&publisher),
            data: &data,
            volatile: false,
            exclude: None,
        };
        g.throughput(Throughput::Elements(members as u64));
        g.bench_with_input(BenchmarkId::from_parameter(members), &members, |b, _| {
            b.iter(|| {
                hub.publish(message, Instant::now(), Box::new(|_| {}))
                    .expect("no limit on new rooms here");
                // Keep queues from growing: drain what one publish queued.
                for (_, rx) in &sessions {
                    rx.try_batch(&mut sink, usize::MAX);
                }
                sink.clear();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decoders, fan_out);
criterion_main!(benches);
