//! The plaintext check: every packet of every pod's captures (pcapng, as
//! dumpcap writes them) is searched for the traffic's markers. A marker in a
//! packet means that request's bytes crossed the link in plaintext. That is
//! allowed only for a request the pod sent while it was let out of the mesh
//! on purpose (from the write that let it out until its agent had it back);
//! any other is a leak.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, ensure};
use mesh_tests::soak::{Event, Kind, MARKER, parse_marker};

use super::timeline::{Timeline, within};

/// A request (or long-lived connection) by its marker: run, client, kind, id.
pub type Key = (String, String, Kind, u64);

/// What one capture file holds.
#[derive(Default)]
pub struct Scan {
    pub packets: u64,
    pub bytes: u64,
    /// Packets the capture says it lost (its interface statistics): each
    /// one could have been a leak.
    pub dropped: u64,
    /// Each request seen in plaintext, with the number of packets.
    pub seen: BTreeMap<Key, u64>,
}

impl Scan {
    fn add(&mut self, other: Scan) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.dropped += other.dropped;
        for (k, n) in other.seen {
            *self.seen.entry(k).or_default() += n;
        }
    }
}

const SECTION_HEADER: u32 = 0x0A0D_0D0A;
const ENHANCED_PACKET: u32 = 6;
const SIMPLE_PACKET: u32 = 3;
const INTERFACE_STATISTICS: u32 = 5;
/// `isb_ifdrop` and `isb_osdrop`: packets lost by the interface and by
/// the capture.
const DROP_OPTIONS: [u16; 2] = [5, 7];
const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;

/// Every packet of a pcapng capture, searched for markers. The markers in
/// the file's raw bytes are counted too, and must all be inside packets:
/// a block this reader skipped would otherwise hide one.
pub fn scan(bytes: &[u8]) -> anyhow::Result<Scan> {
    let mut scan = Scan::default();
    let mut in_packets = 0;
    let mut at = 0;
    let mut big_endian = false;
    while at + 12 <= bytes.len() {
        let word = |i: usize, be: bool| {
            let b: [u8; 4] = bytes[i..i + 4].try_into().expect("4 bytes");
            if be {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        };
        let kind = word(at, false);
        if kind == SECTION_HEADER {
            big_endian = word(at + 8, false) != BYTE_ORDER_MAGIC;
            ensure!(
                word(at + 8, big_endian) == BYTE_ORDER_MAGIC,
                "not a pcapng section at byte {at}"
            );
        }
        let kind = word(at, big_endian);
        let half = |b: &[u8]| {
            let b: [u8; 2] = b[..2].try_into().expect("2 bytes");
            if big_endian {
                u16::from_be_bytes(b)
            } else {
                u16::from_le_bytes(b)
            }
        };
        let long = |b: &[u8]| {
            let b: [u8; 8] = b[..8].try_into().expect("8 bytes");
            if big_endian {
                u64::from_be_bytes(b)
            } else {
                u64::from_le_bytes(b)
            }
        };
        let len = word(at + 4, big_endian) as usize;
        ensure!(
            len >= 12 && len.is_multiple_of(4),
            "a block of {len} bytes at byte {at}"
        );
        if at + len > bytes.len() {
            // The capture was stopped in the middle of a block.
            break;
        }
        let body = &bytes[at + 8..at + len - 4];
        let data = match kind {
            ENHANCED_PACKET if body.len() >= 20 => {
                let captured = word(at + 8 + 12, big_endian) as usize;
                Some(&body[20..(20 + captured).min(body.len())])
            }
            SIMPLE_PACKET if body.len() >= 4 => Some(&body[4..]),
            INTERFACE_STATISTICS => {
                // Options after the interface id and the timestamp.
                let mut opts = body.get(12..).unwrap_or_default();
                while opts.len() >= 4 {
                    let (code, len) = (half(opts), usize::from(half(&opts[2..])));
                    let value = opts.get(4..4 + len).unwrap_or_default();
                    if DROP_OPTIONS.contains(&code) && value.len() == 8 {
                        scan.dropped += long(value);
                    }
                    opts = opts.get(4 + len.next_multiple_of(4)..).unwrap_or_default();
                }
                None
            }
            _ => None,
        };
        if let Some(data) = data {
            scan.packets += 1;
            scan.bytes += data.len() as u64;
            let keys = markers(data);
            in_packets += keys.len();
            let mut distinct = keys;
            distinct.sort();
            distinct.dedup();
            for key in distinct {
                *scan.seen.entry(key).or_default() += 1;
            }
        }
        at += len;
    }
    let raw = markers(&bytes[..at]).len();
    ensure!(
        raw == in_packets,
        "{raw} markers in the file, {in_packets} in its packets: the reader missed some"
    );
    Ok(scan)
}

/// Every whole marker in `data`.
fn markers(data: &[u8]) -> Vec<Key> {
    let needle = MARKER.as_bytes();
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(i) = data[from..].iter().position(|&b| b == needle[0]) {
        let at = from + i;
        if data[at..].starts_with(needle)
            && let Some(key) = parse_marker(&data[at + needle.len()..])
        {
            found.push(key);
        }
        from = at + 1;
    }
    found
}

/// The verdict on every capture together.
pub struct Plaintext {
    pub files: usize,
    pub packets: u64,
    pub bytes: u64,
    pub dropped: u64,
    /// Requests seen in plaintext while their pod was out of the mesh on
    /// purpose, and the packets that carried them.
    pub excused: usize,
    pub excused_packets: u64,
    /// The churn windows whose pod sent at least one such request: the
    /// check's own control (a check that sees no plaintext there is blind).
    pub windows_with_plaintext: usize,
    /// Requests seen in plaintext that should not have been, described.
    pub leaks: Vec<String>,
}

/// Scans each capture and judges what it holds against the events (by
/// their markers) and the churn windows.
pub fn check(files: &[&Path], events: &[Event], timeline: &Timeline) -> anyhow::Result<Plaintext> {
    let keys: std::collections::BTreeSet<Key> = events
        .iter()
        .map(|e| (e.run.clone(), e.client.clone(), e.kind, e.id))
        .collect();
    ensure!(
        keys.len() == events.len(),
        "{} events share a marker: a plaintext packet could not be told apart",
        events.len() - keys.len()
    );
    let mut all = Scan::default();
    for file in files {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        all.add(scan(&bytes).with_context(|| format!("reading {}", file.display()))?);
    }
    Ok(judge(files.len(), all, events, timeline))
}

fn judge(files: usize, all: Scan, events: &[Event], timeline: &Timeline) -> Plaintext {
    let by_key: BTreeMap<Key, &Event> = events
        .iter()
        .map(|e| ((e.run.clone(), e.client.clone(), e.kind, e.id), e))
        .collect();
    let mut verdict = Plaintext {
        files,
        packets: all.packets,
        bytes: all.bytes,
        dropped: all.dropped,
        excused: 0,
        excused_packets: 0,
        windows_with_plaintext: 0,
        leaks: Vec::new(),
    };
    let mut windows = vec![false; timeline.churns.len()];
    for (key, packets) in &all.seen {
        let (run, client, kind, id) = key;
        let Some(event) = by_key.get(key) else {
            verdict.leaks.push(format!(
                "{client} {kind:?} {id} (run {run}): in {packets} packet(s), and no such request was made"
            ));
            continue;
        };
        let out = timeline.churns.iter().position(|c| {
            c.pod == *client && *kind == Kind::Request && within(event.start, c.out_window())
        });
        match out {
            Some(w) => {
                windows[w] = true;
                verdict.excused += 1;
                verdict.excused_packets += packets;
            }
            None => verdict.leaks.push(format!(
                "{client} -> {} {kind:?} {id} at {:.3}: in {packets} packet(s) in plaintext while {client} was in the mesh",
                event.dst, event.start
            )),
        }
    }
    verdict.windows_with_plaintext = windows.iter().filter(|w| **w).count();
    verdict
}

#[cfg(test)]
mod tests {
    use mesh_tests::soak::{Outcome, marker};

    use super::super::timeline::{Churn, ChurnKind};
    use super::*;

    fn block(kind: u32, body: &[u8]) -> Vec<u8> {
        let len = (12 + body.len()).next_multiple_of(4) as u32;
        let mut b = Vec::new();
        b.extend(kind.to_le_bytes());
        b.extend(len.to_le_bytes());
        b.extend(body);
        b.resize(len as usize - 4, 0);
        b.extend(len.to_le_bytes());
        b
    }

    fn packet(data: &[u8]) -> Vec<u8> {
        let mut body = vec![0u8; 12];
        body.extend((data.len() as u32).to_le_bytes());
        body.extend((data.len() as u32).to_le_bytes());
        body.extend(data);
        block(ENHANCED_PACKET, &body)
    }

    fn capture(packets: &[&[u8]]) -> Vec<u8> {
        let mut shb = BYTE_ORDER_MAGIC.to_le_bytes().to_vec();
        shb.extend([1, 0, 0, 0]);
        shb.extend(u64::MAX.to_le_bytes());
        let mut file = block(SECTION_HEADER, &shb);
        file.extend(block(1, &[1, 0, 0, 0, 0, 0, 4, 0]));
        for p in packets {
            file.extend(packet(p));
        }
        file
    }

    fn event(client: &str, id: u64, start: f64) -> Event {
        Event {
            run: "r1".into(),
            client: client.into(),
            dst: "10.2.0.11:8080".parse().expect("addr"),
            kind: Kind::Request,
            id,
            start,
            end: start + 0.01,
            outcome: Outcome::Ok,
            captured: Some(false),
            exchanges: 0,
            detail: String::new(),
        }
    }

    #[test]
    fn plaintext_outside_a_churn_window_is_a_leak_and_inside_is_excused() {
        let m = |c: &str, id| marker("r1", c, Kind::Request, id).repeat(3);
        let tls = [0x17u8, 0x03, 0x03, 0x00, 0x20].repeat(10);
        let file = capture(&[
            tls.as_slice(),
            m("mover", 1).as_bytes(),
            m("mover", 2).as_bytes(),
            m("client", 7).as_bytes(),
        ]);
        let scan = scan(&file).expect("reads");
        assert_eq!(scan.packets, 4);
        assert_eq!(scan.seen.len(), 3);
        let timeline = Timeline {
            churns: vec![Churn {
                pod: "mover".into(),
                how: ChurnKind::PodLabel,
                left: 10.0,
                released: 10.5,
                back: 12.0,
                enrolled: 12.5,
            }],
            ..Timeline::default()
        };
        let events = [
            event("mover", 1, 11.0),
            event("mover", 2, 13.0),
            event("client", 7, 11.0),
        ];
        let v = judge(1, scan, &events, &timeline);
        assert_eq!(v.excused, 1, "mover's request 1 was sent while it was out");
        assert_eq!(v.windows_with_plaintext, 1);
        assert_eq!(v.leaks.len(), 2, "{:?}", v.leaks);
        assert!(
            v.leaks
                .iter()
                .any(|l| l.contains("mover -> ") && l.contains(" 2 "))
        );
        assert!(v.leaks.iter().any(|l| l.contains("client -> ")));
    }

    #[test]
    fn a_marker_outside_any_packet_fails_the_scan() {
        let mut file = capture(&[b"nothing here"]);
        // A block type this reader does not know, holding a marker.
        file.extend(block(
            0x0BAD,
            marker("r1", "c", Kind::Request, 1).as_bytes(),
        ));
        let err = scan(&file).err().expect("inconsistent");
        assert!(err.to_string().contains("missed"), "{err}");
    }

    #[test]
    fn packets_the_capture_lost_are_counted() {
        let mut file = capture(&[b"one"]);
        let mut isb = vec![0u8; 12];
        for (code, value) in [(4u16, 10u64), (5, 2), (7, 3)] {
            isb.extend(code.to_le_bytes());
            isb.extend(8u16.to_le_bytes());
            isb.extend(value.to_le_bytes());
        }
        isb.extend([0, 0, 0, 0]);
        file.extend(block(INTERFACE_STATISTICS, &isb));
        let scan = scan(&file).expect("reads");
        assert_eq!((scan.packets, scan.dropped), (1, 5));
    }

    #[test]
    fn a_capture_cut_mid_block_reads_up_to_the_cut() {
        let m = marker("r1", "c", Kind::Request, 1);
        let mut file = capture(&[m.as_bytes(), m.as_bytes()]);
        file.truncate(file.len() - 6);
        let scan = scan(&file).expect("reads");
        assert_eq!(scan.packets, 1);
    }
}
